"""Where bottleneck adapters sit and how they go in and out: add_bottleneck / remove_bottleneck.

Per ``model_type`` a ``Layout`` names the layer list and, for each location (after attention,
after the feed-forward block), the module whose output is the sub-block output h (wrapped), the
module that receives the residual stream x (a forward pre-hook hands x to the adapter, only
when the config needs it) and the post-norm (BERT) or None (pre-norm decoders).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .bottleneck import LOCATIONS, BottleneckAdapter, BottleneckConfig
from .inject import _set_submodule


@dataclass(frozen=True)
class Site:
    """One adapter location inside a transformer layer (paths relative to the layer)."""

    producer: str            # module whose output is h (wrapped by BottleneckAdapter)
    residual: str            # module that receives the residual stream x ...
    residual_arg: int        # ... as this positional argument ...
    residual_kw: str         # ... or this keyword
    layer_norm: Optional[str]  # the post-norm the model applies to h + x; None for pre-norm layers
    hub: str                 # AdapterHub's module path for this location (its saved keys)


@dataclass(frozen=True)
class Layout:
    """A model family's layer list (dotted suffix of its ``nn.ModuleList`` name) and sites."""

    layers: str
    sites: dict  # location ("mh_adapter" / "output_adapter") -> Site


def _bert_like() -> Layout:
    return Layout("encoder.layer", {
        "mh_adapter": Site("attention.output.dropout", "attention.output", 1, "input_tensor",
                           "attention.output.LayerNorm", "attention.output"),
        "output_adapter": Site("output.dropout", "output", 1, "input_tensor", "output.LayerNorm", "output")})


def _llama_like() -> Layout:
    return Layout("layers", {
        "mh_adapter": Site("self_attn.o_proj", "input_layernorm", 0, "hidden_states", None, "attention_adapters"),
        "output_adapter": Site("mlp.down_proj", "post_attention_layernorm", 0, "hidden_states", None,
                               "output_adapters")})


# AdapterHub places the adapter after BertSelfOutput's / BertOutput's dropout (the model then
# computes LN(a + x)), the same in RoBERTa; in GPT-2 after the attention's resid_dropout and the
# MLP's dropout; in Llama and Mistral after o_proj and down_proj (then the layer adds x).
# Each entry is checked against the stored AdapterHub reference (tests/lora/test_bottleneck.py).
LAYOUTS: dict[str, Layout] = {
    "bert": _bert_like(),
    "gpt2": Layout("h", {
        "mh_adapter": Site("attn.resid_dropout", "ln_1", 0, "input", None, "attention_adapters"),
        "output_adapter": Site("mlp.dropout", "ln_2", 0, "input", None, "output_adapters")}),
    "roberta": _bert_like(),
    "llama": _llama_like(),
    "mistral": _llama_like(),
}

_STATE = "_bottleneck_state"


class _CaptureResidual:
    """Forward pre-hook: hands the residual stream x to a BottleneckAdapter. A class, not a
    closure, so ``copy.deepcopy(model)`` points the copy's hook at the copy's adapter."""

    def __init__(self, adapter: BottleneckAdapter, index: int, keyword: str) -> None:
        self.adapter, self.index, self.keyword = adapter, index, keyword

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.adapter._residual = args[self.index] if len(args) > self.index else kwargs[self.keyword]


@dataclass
class BottleneckState:
    """What ``add_bottleneck`` leaves on the model (as ``model._bottleneck_state``)."""

    config: BottleneckConfig
    layout: Layout
    # requires_grad of every base parameter before add_bottleneck, restored by remove_bottleneck
    requires_grad: dict
    # the pre-hooks' handles, removed by remove_bottleneck
    hooks: list


def bottleneck_state(model: nn.Module) -> BottleneckState:
    """The bottleneck state of a model; ``ValueError`` when it has no bottleneck adapter."""
    state = getattr(model, _STATE, None)
    if not isinstance(state, BottleneckState):
        raise ValueError(f"{type(model).__name__} has no bottleneck adapter (call add_bottleneck first)")
    return state


def layout_of(model: nn.Module) -> Layout:
    """The registry entry for ``model.config.model_type``; ``ValueError`` names the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise ValueError(f"bottleneck adapters: unsupported architecture model_type={model_type!r} "
                         f"({type(model).__name__}); supported: {sorted(LAYOUTS)}")
    return LAYOUTS[model_type]


def layer_list(model: nn.Module, layout: Layout) -> tuple[str, nn.ModuleList]:
    """(full name, module) of the model's transformer layer list."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and (n == layout.layers or n.endswith("." + layout.layers))]
    if len(found) != 1:
        raise ValueError(f"bottleneck adapters: expected one layer list named '*{layout.layers}' in "
                         f"{type(model).__name__}, found {[n for n, _ in found]}")
    return found[0]


def _sub(layer: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        raise ValueError(f"bottleneck adapters: {where} has no module {path!r} (not the layout expected "
                         f"for this model_type)") from None


def adapter_sites(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """Every BottleneckAdapter by full module name, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def add_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Freeze ``model`` and wrap each site's producer in a ``BottleneckAdapter`` (in place).

    Adapters are built layer by layer, attention before feed-forward (AdapterHub's order, so the
    same seed gives the same initial weights). On any error the model is unchanged.

    Raises:
        TypeError: ``config`` is not a BottleneckConfig.
        ValueError: unsupported architecture, an adapter already present, ``leave_out`` beyond
            the layers, or ``residual_before_ln='post_add'`` on a pre-norm model.
    """
    if not isinstance(config, BottleneckConfig):
        raise TypeError(f"add_bottleneck expects a BottleneckConfig, got {type(config).__name__}")
    if hasattr(model, _STATE) or adapter_sites(model):
        raise ValueError("the model already has a bottleneck adapter; call remove_bottleneck(model) first")
    layout = layout_of(model)
    hidden = int(model.config.hidden_size)
    prefix, layers = layer_list(model, layout)
    bad = [i for i in config.leave_out if i >= len(layers)]
    if bad:
        raise ValueError(f"BottleneckConfig.leave_out={list(config.leave_out)}: layers {bad} do not exist "
                         f"({len(layers)} layers)")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = []  # (full name, wrapper, residual module or None)
    for i, layer in enumerate(layers):
        if i in config.leave_out:
            continue
        for location in LOCATIONS:
            if not getattr(config, location):
                continue
            site, where = layout.sites[location], f"{prefix}.{i}"
            if config.residual_before_ln == "post_add" and site.layer_norm is None:
                raise ValueError(f"BottleneckConfig.residual_before_ln='post_add' needs a post-norm layer; "
                                 f"{model.config.model_type} applies no layer norm after {site.producer}")
            base = _sub(layer, site.producer, where)
            ln = _sub(layer, site.layer_norm, where) if site.layer_norm else None
            residual = _sub(layer, site.residual, where) if config.original_ln_before else None
            wrapper = BottleneckAdapter(base, hidden, config.bottleneck_size(hidden, i), config, ln)
            plan.append((f"{where}.{site.producer}", wrapper.train(base.training), residual, site))
    # ---- mutation starts here
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = []
    for name, wrapper, residual, site in plan:
        _set_submodule(model, name, wrapper)
        if residual is not None:
            hook = _CaptureResidual(wrapper, site.residual_arg, site.residual_kw)
            hooks.append(residual.register_forward_pre_hook(hook, with_kwargs=True))
    setattr(model, _STATE, BottleneckState(config=config, layout=layout, requires_grad=flags, hooks=hooks))
    for p in bottleneck_parameters(model):
        p.requires_grad_(True)
    return model


def remove_bottleneck(model: nn.Module) -> nn.Module:
    """Remove the hooks and put back the very same base module objects and ``requires_grad`` flags."""
    state = bottleneck_state(model)
    for handle in state.hooks:
        handle.remove()
    for name, wrapper in adapter_sites(model).items():
        _set_submodule(model, name, wrapper.base_layer)
    delattr(model, _STATE)
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, p.requires_grad))
    return model


def bottleneck_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter by its saved name ``<wrapped module>.<local name>``, e.g.
    ``encoder.layer.0.output.dropout.adapter_down.weight`` [m, d]; selected by module type."""
    bottleneck_state(model)
    return {f"{n}.{k}": p for n, m in adapter_sites(model).items() for k, p in m.adapter_params().items()}


def bottleneck_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (the adapters' own), each once."""
    return list({id(p): p for p in bottleneck_tensors(model).values()}.values())


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (detached) by saved name."""
    return {k: p.detach() for k, p in bottleneck_tensors(model).items()}
