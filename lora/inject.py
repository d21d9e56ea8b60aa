"""Module surgery: add_lora / remove_lora / merge_lora / unmerge_lora, and what trains.

One function, ``adapter_tensors``, walks the model by module type and names every tensor that
belongs to the adapter; it decides both what trains (``lora_parameters``) and what is saved
(``lora.io.lora_state_dict``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from .config import LoRAConfig
from .heads import TrainedCopy
from .hf_save import refresh_save_guard
from .layer import LoRALinear
from .targets import resolve_heads, resolve_targets

_STATE = "_lora_state"  # attribute set on the model by add_lora
logger = logging.getLogger(__name__)


@dataclass
class LoRAState:
    """What ``add_lora`` leaves on the model (as ``model._lora_state``)."""

    config: LoRAConfig
    # requires_grad of every base parameter before add_lora, restored by remove_lora
    requires_grad: dict[str, bool]


def lora_state(model: nn.Module) -> LoRAState:
    """The LoRA state of a model; ``ValueError`` when it has no adapter."""
    state = getattr(model, _STATE, None)
    if not isinstance(state, LoRAState):
        raise ValueError(f"{type(model).__name__} has no LoRA adapter (call add_lora first)")
    return state


def _has_lora(model: nn.Module) -> bool:
    return hasattr(model, _STATE) or any(isinstance(m, (LoRALinear, TrainedCopy)) for m in model.modules())


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules that yields LoRALinear/TrainedCopy but does not descend into them."""
    yield prefix, module
    if isinstance(module, (LoRALinear, TrainedCopy)):
        return
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def adapter_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter by its saved name (peft's key minus ``base_model.model.``).

    - LoRALinear at ``p``: ``p.lora_A.weight`` [r, in], ``p.lora_B.weight`` [out, r],
      ``p.lora_magnitude_vector`` [out] (DoRA), ``p.base_layer.bias`` (bias "lora_only"/"all");
    - TrainedCopy at ``p``: ``p.<name>`` for each parameter of the trained copy;
    - bias "all": also ``<module>.bias`` of every other module.
    """
    bias = lora_state(model).config.bias
    out: dict[str, nn.Parameter] = {}
    for name, module in _walk(model):
        pre = f"{name}." if name else ""
        if isinstance(module, LoRALinear):
            out[pre + "lora_A.weight"] = module.lora_A.weight
            out[pre + "lora_B.weight"] = module.lora_B.weight
            if module.lora_magnitude_vector is not None:
                out[pre + "lora_magnitude_vector"] = module.lora_magnitude_vector
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


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze ``model`` and swap the targeted linear-like modules for ``LoRALinear`` (in place).

    Everything is resolved and built before the model is touched, so on any error the model is
    unchanged.

    Args:
        model: a base model without LoRA.
        config: the adapter's hyper-parameters.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: the model already has LoRA, no target matched (the message lists the
            linear-like names), a matched module is not linear-like, or a head was not found.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"add_lora expects a LoRAConfig, got {type(config).__name__}")
    if _has_lora(model):
        raise ValueError("the model already has LoRA adapters; call remove_lora(model) before adding again")
    heads = resolve_heads(model, config.modules_to_save)
    targets = resolve_targets(model, config.target_modules, exclude=heads)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    wrappers = {}
    for name in targets:  # named_modules order: the same random draws as peft
        base = model.get_submodule(name)
        wrapper = LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora, config.use_dora)
        wrappers[name] = wrapper.train(base.training)
    copies = {name: TrainedCopy(model.get_submodule(name)) for name in heads}
    if type(model).__name__.endswith("ForSequenceClassification") and not heads:
        logger.warning("%s: the classification head stays frozen (and random if new); pass "
                       "modules_to_save=('classifier',) or ('score',) to train it", type(model).__name__)
    # ---- mutation starts here
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in {**wrappers, **copies}.items():
        _set_submodule(model, name, module)
    setattr(model, _STATE, LoRAState(config=config, requires_grad=flags))
    for p in lora_parameters(model):
        p.requires_grad_(True)
    refresh_save_guard(model)  # transformers' save_pretrained would lose the base weights
    return model


def _wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in _walk(model) if isinstance(m, (LoRALinear, TrainedCopy))]


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
    if merge:
        for _, m in found:
            if isinstance(m, LoRALinear):
                m._check_mergeable()
    for name, m in found:
        if isinstance(m, LoRALinear):
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
    """Fold every adapter into its base weight (fp32 delta); forward then runs the base only.
    Idempotent. Raises ``RuntimeError`` for quantized bases before touching any layer."""
    lora_state(model)
    layers = [m for _, m in _wrappers(model) if isinstance(m, LoRALinear)]
    for m in layers:
        m._check_mergeable()
    for m in layers:
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight. Idempotent."""
    lora_state(model)
    for _, m in _wrappers(model):
        if isinstance(m, LoRALinear):
            m.unmerge()
    return model
