"""IA3 ((IA)^3, "infused adapter by inhibiting and amplifying inner activations"): learned
vectors that rescale the keys, values and feed-forward activations of a frozen model.

For a targeted linear-like layer with weight W [out, in] and a trainable vector l (init ones):

    attention-side target (keys, values):   y = base(x) * l       l = ia3_l: [out, 1]
    feed-forward target:                    y = base(x * l)       l = ia3_l: [1, in]

Merged: W <- W * l^T row-wise (attention side, and the bias <- bias * l) or column-wise
(feed-forward: W <- W * l). Default targets and feed-forward modules per ``model_type`` are
peft 0.21.2's (``lora.targets.IA3_DEFAULT_TARGETS`` / ``IA3_FEEDFORWARD``). The surgery, walk,
removal, merging and saving are the shared ones of ``lora.inject`` / ``lora.io``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import AdapterLayer
from .config import ALL_LINEAR, TargetSpec, _check_names, _check_targets
from .inject import check_no_adapter, inject_adapters
from .layer import _features
from .targets import IA3_DEFAULT_TARGETS, IA3_FEEDFORWARD, resolve_heads, resolve_targets


@dataclass(frozen=True)
class IA3Config:
    """Hyper-parameters of an IA3 adapter (peft's ``IA3Config`` names; IA3 has no rank or alpha).

    ``target_modules`` matches like ``LoRAConfig.target_modules`` (None: the IA3 registry default
    for ``model.config.model_type``). ``feedforward_modules`` follows peft's rule: a list entry
    matches when the full module name *ends with* it (a plain suffix, no dot needed), a str must
    ``re.fullmatch`` the full name; None: the registry's feed-forward names for the model type.
    """

    # which linear-like modules get a vector (peft: target_modules)
    target_modules: TargetSpec = None
    # which of the targets scale their input (feed-forward) instead of their output (peft: feedforward_modules)
    feedforward_modules: TargetSpec = None
    # modules (exact name or dotted suffix) that get a trainable full copy, e.g. ("classifier",)
    modules_to_save: Sequence[str] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _check_targets(self.target_modules, owner="IA3Config"))
        ff = self.feedforward_modules
        if isinstance(ff, (list, tuple, set, frozenset)) and not ff:
            ff = ()  # an explicit empty list: no feed-forward module
        elif ff is not None:
            ff = _check_targets(ff, "feedforward_modules", "IA3Config")
            if ff == ALL_LINEAR:
                raise ValueError("IA3Config.feedforward_modules='all-linear': expected names or a regex")
        object.__setattr__(self, "feedforward_modules", ff)
        targets = self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            raise ValueError(f"IA3Config.feedforward_modules={list(ff)} must be a subset of "
                             f"target_modules={list(targets)} (missing {sorted(set(ff) - set(targets))})")
        object.__setattr__(self, "modules_to_save",
                           _check_names("modules_to_save", self.modules_to_save, "IA3Config"))


def is_feedforward(name: str, spec: Union[str, Sequence[str]]) -> bool:
    """peft's test: a str is a full regex match, a list entry a plain suffix of the full name."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(entry) for entry in spec)


class IA3Layer(AdapterLayer):
    """A frozen linear-like ``base_layer`` (nn.Linear, Conv1D, NF4 linear) and the vector ``ia3_l``.

    Args:
        base: the layer to rescale.
        is_feedforward: scale the input (``ia3_l`` [1, in]) instead of the output (``ia3_l`` [out, 1]).
    """

    def __init__(self, base: nn.Module, is_feedforward: bool = False) -> None:
        super().__init__()
        in_f, out_f = _features(base)
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.is_feedforward = bool(is_feedforward)
        self.fan_in_fan_out = isinstance(base, Conv1D)
        shape = (1, in_f) if self.is_feedforward else (out_f, 1)
        tensors = list(base.parameters(recurse=False)) + list(base.buffers(recurse=False))
        device = tensors[0].device if tensors else None
        self.ia3_l = nn.Parameter(torch.ones(shape, device=device))  # fp32 ones: starts equal to the base
        self.merged = False

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """``ia3_l``: [1, in] (feed-forward) or [out, 1] (peft's key and shapes)."""
        return {"ia3_l": self.ia3_l}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., in) -> (..., out) in the base output dtype."""
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l.flatten()                                   # (in,) or (out,)
        if self.is_feedforward:
            # scale in the vector dtype, then hand the base its usual input dtype
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)                   # (..., out)
        return (result * scale).to(result.dtype)

    # ----------------------------------------------------------------------------------------- merge
    def _factor(self) -> torch.Tensor:
        """The vector shaped to multiply the base weight as stored (Conv1D stores [in, out])."""
        v = self.ia3_l.detach().float()                                # [1, in] or [out, 1]
        return v.t() if self.fan_in_fan_out else v

    @torch.no_grad()
    def _rescale(self, divide: bool) -> None:
        w, v = self.base_layer.weight, self._factor()
        w.copy_((w.float() / v if divide else w.float() * v).to(w.dtype))
        bias = getattr(self.base_layer, "bias", None)
        if not self.is_feedforward and isinstance(bias, torch.Tensor):
            b = self.ia3_l.detach().float().flatten()                  # (out,)
            bias.copy_((bias.float() / b if divide else bias.float() * b).to(bias.dtype))

    def merge(self) -> None:
        """W <- W * l (and bias <- bias * l on the output side), in fp32. Idempotent."""
        if self.merged:
            return
        self._check_mergeable()
        self._rescale(divide=False)
        self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge`` by dividing by l (exact up to fp32 rounding). Idempotent.

        Raises:
            ValueError: an entry of ``ia3_l`` is 0, so the merged weight lost that row/column.
        """
        if not self.merged:
            return
        self._check_unmergeable()
        self._rescale(divide=True)
        self.merged = False

    def _check_unmergeable(self) -> None:
        if self.merged and bool((self.ia3_l == 0).any()):
            raise ValueError("cannot unmerge IA3: ia3_l has zero entries, the merged weight lost them")

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}, shape={tuple(self.ia3_l.shape)}, merged={self.merged}"


def _feedforward_spec(model: nn.Module, config: IA3Config) -> Union[str, tuple[str, ...]]:
    if config.feedforward_modules is not None:
        return config.feedforward_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in IA3_FEEDFORWARD:
        raise ValueError(f"no default IA3 feed-forward modules for model_type={model_type!r}; pass "
                         f"IA3Config(feedforward_modules=...) (known types: {sorted(IA3_FEEDFORWARD)})")
    return IA3_FEEDFORWARD[model_type]


def add_ia3(model: nn.Module, config: IA3Config) -> nn.Module:
    """Freeze ``model`` and swap the targeted linear-like modules for ``IA3Layer`` (in place).

    Remove, merge, unmerge, save and load with the shared ``lora`` functions (``remove_lora``,
    ``merge_lora``, ``unmerge_lora``, ``save_lora``, ``load_lora``). On any error the model is
    unchanged.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: the model already has an adapter, an unknown model type without explicit
            targets, no target matched, a matched module is not linear-like, or a head was not found.
    """
    if not isinstance(config, IA3Config):
        raise TypeError(f"add_ia3 expects an IA3Config, got {type(config).__name__}")
    check_no_adapter(model)
    heads = resolve_heads(model, config.modules_to_save)
    targets = resolve_targets(model, config.target_modules, exclude=heads, embeddings=False,
                              registry=IA3_DEFAULT_TARGETS, what="IA3")
    ff = _feedforward_spec(model, config)
    return inject_adapters(model, config, targets,
                           lambda name, base: IA3Layer(base, is_feedforward(name, ff)), heads)


def peft_fields(model: nn.Module, config: IA3Config, wrapped: Sequence[tuple[str, nn.Module]]) -> dict[str, Any]:
    """The IA3-specific part of peft's ``adapter_config.json`` for this model's adapter."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets: Any = config.target_modules
    ff: Any = _feedforward_spec(model, config)
    if targets is None:
        targets = list(IA3_DEFAULT_TARGETS[model_type])
    elif targets == ALL_LINEAR:  # the resolved full names; feed-forward ones too (a subset, as peft requires)
        targets = sorted(n for n, m in wrapped if isinstance(m, IA3Layer))
        ff = sorted(n for n, m in wrapped if isinstance(m, IA3Layer) and m.is_feedforward)
    elif not isinstance(targets, str):
        targets = list(targets)
    return {"peft_type": "IA3", "target_modules": targets,
            "feedforward_modules": ff if isinstance(ff, str) else list(ff),
            "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for _, m in wrapped),
            "modules_to_save": list(config.modules_to_save) or None, "init_ia3_weights": True,
            "exclude_modules": None}


def config_from_peft(raw: dict[str, Any], where: str = "adapter_config.json") -> IA3Config:
    """An IA3Config from peft's IA3 config dict; rejects options this package does not implement."""
    if raw.get("exclude_modules") not in (None, [], ""):
        raise ValueError(f"{where}: exclude_modules={raw['exclude_modules']!r} is not supported by lora's IA3 "
                         f"(expected null)")
    return IA3Config(target_modules=raw.get("target_modules"), feedforward_modules=raw.get("feedforward_modules"),
                     modules_to_save=tuple(raw.get("modules_to_save") or ()))
