"""Module surgery shared by every weight-side method: inject / remove / merge / unmerge, and what trains.

``inject_adapters`` is the one swap of targeted modules for ``AdapterLayer`` wrappers (LoRA on linear and
embedding layers here, IA3 in ``lora.ia3``, ...); ``add_lora`` builds LoRA's wrappers and calls it.
One function, ``adapter_tensors``, walks the model by module type and names every tensor that
belongs to the adapter; it decides both what trains (``lora_parameters``) and what is saved
(``lora.io.lora_state_dict``). ``remove_lora`` / ``merge_lora`` / ``unmerge_lora`` work on any
wrapper, whatever method built it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from .base import AdapterLayer
from .config import LoRAConfig
from .embedding import LoRAEmbedding
from .heads import TrainedCopy
from .hf_save import refresh_save_guard
from .layer import LoRALinear
from .targets import resolve_heads, resolve_targets

_STATE = "_lora_state"  # attribute set on the model by inject_adapters
logger = logging.getLogger(__name__)


@dataclass
class AdapterState:
    """What ``inject_adapters`` leaves on the model (as ``model._lora_state``)."""

    # the method's frozen config (LoRAConfig, IA3Config, ...)
    config: Any
    # requires_grad of every base parameter before injection, restored by remove_lora
    requires_grad: dict[str, bool]


LoRAState = AdapterState  # the earlier name


def lora_state(model: nn.Module) -> AdapterState:
    """The adapter state of a model; ``ValueError`` when it has no adapter."""
    state = getattr(model, _STATE, None)
    if not isinstance(state, AdapterState):
        raise ValueError(f"{type(model).__name__} has no LoRA adapter (call add_lora first)")
    return state


def _has_lora(model: nn.Module) -> bool:
    return hasattr(model, _STATE) or any(isinstance(m, (AdapterLayer, TrainedCopy)) for m in model.modules())


def check_no_adapter(model: nn.Module) -> None:
    """Raise ``ValueError`` when ``model`` already carries an adapter of any ``lora`` method."""
    if _has_lora(model):
        raise ValueError("the model already has LoRA adapters; call remove_lora(model) before adding again")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules that yields wrappers (AdapterLayer, TrainedCopy) but does not descend into them."""
    yield prefix, module
    if isinstance(module, (AdapterLayer, TrainedCopy)):
        return
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def adapter_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter by its saved name (peft's key minus ``base_model.model.``).

    - an AdapterLayer at ``p``: ``p.<k>`` for each entry of its ``adapter_params()``, e.g.
      LoRALinear's ``p.lora_A.weight`` [r, in], ``p.lora_B.weight`` [out, r],
      ``p.lora_magnitude_vector`` [out] (DoRA), LoRAEmbedding's ``p.lora_embedding_A`` [r, V],
      ``p.lora_embedding_B`` [d, r], IA3's ``p.ia3_l``; plus ``p.base_layer.bias`` (bias
      "lora_only"/"all");
    - TrainedCopy at ``p``: ``p.<name>`` for each parameter of the trained copy;
    - bias "all": also ``<module>.bias`` of every other module.
    """
    bias = getattr(lora_state(model).config, "bias", "none")
    out: dict[str, nn.Parameter] = {}
    for name, module in _walk(model):
        pre = f"{name}." if name else ""
        if isinstance(module, AdapterLayer):
            out.update({pre + k: p for k, p in module.adapter_params().items()})
            base_bias = module.base_layer._parameters.get("bias")
            if bias != "none" and base_bias is not None:
                out[pre + "base_layer.bias"] = base_bias
        elif isinstance(module, TrainedCopy):
            out.update({pre + k: p for k, p in module.trained.named_parameters()})
        elif bias == "all" and module._parameters.get("bias") is not None:
            out[pre + "bias"] = module._parameters["bias"]
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (adapters, trained head copies, selected biases), each once."""
    unique = {id(p): p for p in adapter_tensors(model).values()}
    return list(unique.values())


def inject_adapters(model: nn.Module, config: Any, targets: Sequence[str],
                    build: Callable[[str, nn.Module], AdapterLayer], heads: Sequence[str] = ()) -> nn.Module:
    """The one surgery: freeze ``model``, swap each target for ``build(name, module)``, give each
    head a ``TrainedCopy``, and record ``config`` (in place).

    Every wrapper is built before the model is touched, so when ``build`` raises the model is
    unchanged. Wrappers are built in the given order (``named_modules`` order: the same random
    draws as peft) and take the train/eval mode of the module they replace.

    Args:
        model: a base model without an adapter.
        config: the method's frozen config (kept as ``lora_state(model).config``).
        targets: full module names to wrap (``lora.targets.resolve_targets``).
        build: makes the wrapper of one target from its name and module.
        heads: full names of ``modules_to_save`` modules (``lora.targets.resolve_heads``).

    Returns:
        The same ``model`` object.
    """
    check_no_adapter(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    wrappers = {}
    for name in targets:
        base = model.get_submodule(name)
        wrappers[name] = build(name, base).train(base.training)
    copies = {name: TrainedCopy(model.get_submodule(name)) for name in heads}
    if type(model).__name__.endswith("ForSequenceClassification") and not heads:
        logger.warning("%s: the classification head stays frozen (and random if new); pass "
                       "modules_to_save=('classifier',) or ('score',) to train it", type(model).__name__)
    # ---- mutation starts here
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in {**wrappers, **copies}.items():
        _set_submodule(model, name, module)
    setattr(model, _STATE, AdapterState(config=config, requires_grad=flags))
    for p in lora_parameters(model):
        p.requires_grad_(True)
    refresh_save_guard(model)  # transformers' save_pretrained would lose the base weights
    return model


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze ``model`` and swap the targeted modules for ``LoRALinear`` (linear-like layers) or
    ``LoRAEmbedding`` (``nn.Embedding``), in place.

    Each module's rank and alpha come from ``config.rank_for(name)`` / ``alpha_for(name)``
    (``rank_pattern`` / ``alpha_pattern``); ``layers_to_transform`` limits the targets to those
    layer indices. Everything is resolved and built before the model is touched, so on any error
    the model is unchanged.

    Args:
        model: a base model without LoRA.
        config: the adapter's hyper-parameters.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: the model already has LoRA, no target matched (the message lists the
            wrappable names), a matched module is of another type, DoRA on an embedding, or a
            head was not found.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"add_lora expects a LoRAConfig, got {type(config).__name__}")
    check_no_adapter(model)
    heads = resolve_heads(model, config.modules_to_save)
    targets = resolve_targets(model, config.target_modules, exclude=heads, layers=config.layers_to_transform,
                              layers_pattern=config.layers_pattern)

    def build(name: str, base: nn.Module) -> AdapterLayer:
        r, alpha = config.rank_for(name), config.alpha_for(name)
        if isinstance(base, nn.Embedding):
            if config.use_dora:
                raise ValueError(f"use_dora=True is not supported on the embedding {name!r}; "
                                 f"drop it from target_modules or turn DoRA off")
            return LoRAEmbedding(base, r, alpha, config.use_rslora)
        return LoRALinear(base, r, alpha, config.dropout, config.use_rslora, config.use_dora)

    return inject_adapters(model, config, targets, build, heads)


def _wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in _walk(model) if isinstance(m, (AdapterLayer, TrainedCopy))]


def _check_merge(model: nn.Module, layers: list[tuple[str, AdapterLayer]]) -> None:
    """Every reason a merge would fail or change more than the adapted layer, before touching any."""
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight")
        if w is not None:
            owners.setdefault(id(w), []).append(n)
    for name, m in layers:
        m._check_mergeable()
        if isinstance(m, LoRAEmbedding):
            others = [o for o in owners.get(id(m.base_layer.weight), []) if o != f"{name}.base_layer"]
            if others:
                raise RuntimeError(f"cannot merge LoRA into the embedding {name!r}: its weight is shared with "
                                   f"{others} (tied output head), which merging would change too")


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put back the very same base module objects.

    Args:
        model: a model with LoRA.
        merge: ``False``: unmerge if merged, restore the original heads; the model is the base
            again. ``True``: merge each update into its base weight (fp32 math) and keep the
            trained head copies in place of the originals.

    Returns:
        The same ``model`` object; parameters get back their ``requires_grad`` from before add_lora.
    """
    state = lora_state(model)
    found = _wrappers(model)
    layers = [m for _, m in found if isinstance(m, AdapterLayer)]
    if merge:
        _check_merge(model, [(n, m) for n, m in found if isinstance(m, AdapterLayer)])
    else:
        for m in layers:
            m._check_unmergeable()
    for name, m in found:
        if isinstance(m, AdapterLayer):
            if merge:
                m.merge()
            else:
                m.unmerge()  # back to the exact base weights the model had (up to fp32 rounding)
            _set_submodule(model, name, m.base_layer)
        else:
            _set_submodule(model, name, m.trained if merge else m.original)
    delattr(model, _STATE)
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, p.requires_grad))
    refresh_save_guard(model)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (fp32 math); forward then runs the base only.
    Idempotent. Raises ``RuntimeError`` for quantized bases, and for an embedding whose weight is
    tied to the output head, before touching any layer."""
    lora_state(model)
    layers = [(n, m) for n, m in _wrappers(model) if isinstance(m, AdapterLayer)]
    _check_merge(model, layers)
    for _, m in layers:
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight. Idempotent. Raises before touching
    any layer when one cannot be unmerged (an IA3 vector with a zero entry)."""
    lora_state(model)
    layers = [m for _, m in _wrappers(model) if isinstance(m, AdapterLayer)]
    for m in layers:
        m._check_unmergeable()
    for m in layers:
        m.unmerge()
    return model
