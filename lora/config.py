"""LoRAConfig: the hyper-parameters of one LoRA adapter, validated on construction."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

BIAS_CHOICES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"

TargetSpec = Union[None, str, Sequence[str]]


@dataclass(frozen=True)
class LoRAConfig:
    """Hyper-parameters of a LoRA adapter (field names follow the math, peft's names in comments).

    ``target_modules``:
      - ``None``: the registry default for ``model.config.model_type`` (see ``lora.targets``);
      - a list/tuple: a module matches when its full name equals an entry or ends with ``"." + entry``;
      - a ``str``: a regular expression that must ``re.fullmatch`` the full module name;
      - ``"all-linear"``: every linear-like layer except the output head.
    """

    # rank of the update B @ A (peft: r); A is [r, in], B is [out, r]
    r: int = 8
    # numerator of the scaling: alpha / r, or alpha / sqrt(r) with use_rslora (peft: lora_alpha)
    alpha: float = 8
    # dropout probability on the LoRA branch input only (peft: lora_dropout)
    dropout: float = 0.0
    # which linear-like modules get an adapter; see the class docstring
    target_modules: TargetSpec = None
    # rank-stabilized scaling alpha / sqrt(r)
    use_rslora: bool = False
    # weight-decomposed LoRA: a trainable per-output-row magnitude m
    use_dora: bool = False
    # which biases train and are saved: "none", "all" (every *.bias), "lora_only" (wrapped layers)
    bias: str = "none"
    # modules (exact name or dotted suffix) that get a trainable full copy, e.g. ("classifier",)
    modules_to_save: Sequence[str] = ()

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r={self.r!r}: expected a positive int")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r}: expected a finite number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r}: expected a float in [0, 1)")
        object.__setattr__(self, "target_modules", _check_targets(self.target_modules))
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoRAConfig.{name}={getattr(self, name)!r}: expected a bool")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoRAConfig.bias={self.bias!r}: expected one of {BIAS_CHOICES}")
        object.__setattr__(self, "modules_to_save", _check_names("modules_to_save", self.modules_to_save))

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def _check_targets(spec: TargetSpec) -> Union[None, str, tuple[str, ...]]:
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"LoRAConfig.target_modules={spec!r}: not a valid regular expression ({err})")
        return spec
    names = _check_names("target_modules", spec)
    if not names:
        raise ValueError("LoRAConfig.target_modules=(): expected None, a regex, 'all-linear' or a non-empty list")
    return names


def _check_names(field: str, names: Optional[Sequence[str]]) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise ValueError(f"LoRAConfig.{field}={names!r}: expected a list or tuple of module names")
    out = tuple(sorted(names)) if isinstance(names, (set, frozenset)) else tuple(names)
    for name in out:
        if not isinstance(name, str) or not name:
            raise ValueError(f"LoRAConfig.{field}={names!r}: every entry must be a non-empty str, got {name!r}")
    return out
