"""Which modules get an adapter: wrappable types, per-model defaults (LoRA and IA3), name and
layer-index matching. Every method in ``lora`` resolves its targets here."""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ALL_LINEAR
from .nf4_linear import NF4Linear

# Classes LoRALinear can wrap. A linear-like base has `in_features`/`out_features` (Conv1D is
# handled by its [in, out] weight) and a forward; quantized ones also `dequantize(dtype)`.
LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D, NF4Linear)
# what LoRA wraps: linear-like layers and token embeddings (LoRAEmbedding)
LORA_TYPES: tuple[type, ...] = (*LINEAR_TYPES, nn.Embedding)

# model_type -> default target names (peft 0.21.2's defaults for these model types).
_QV = ("q_proj", "v_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{t: _QV for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "opt", "gptj", "gpt_neo",
                        "gemma", "gemma2", "gemma3_text", "bart", "stablelm")},
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    **{t: ("query_key_value",) for t in ("bloom", "falcon", "gpt_neox", "chatglm")},
    **{t: ("query", "value") for t in ("bert", "roberta", "xlm-roberta", "electra", "layoutlm")},
    "deberta-v2": ("query_proj", "value_proj"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "mpt": ("Wqkv",),
}

# IA3: model_type -> default targets, and which of them are feed-forward (their vector scales
# the layer input rather than its output); peft 0.21.2's tables for these model types
IA3_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "mlp.c_proj"), "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    **{t: ("key", "value", "output.dense") for t in ("bert", "roberta")},
    "opt": ("q_proj", "k_proj", "fc2"), "gptj": ("q_proj", "v_proj", "fc_out"),
    **{t: ("query_key_value", "dense_4h_to_h") for t in ("gpt_neox", "falcon")},
    "gpt_neo": ("q_proj", "v_proj", "c_proj"), "bart": ("q_proj", "v_proj", "fc2"),
    **{t: ("k_proj", "v_proj", "down_proj") for t in ("llama", "mistral")},
    "mixtral": ("k_proj", "v_proj", "w2"), "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "phi": ("q_proj", "v_proj", "fc2"),
    **{t: ("q_proj", "v_proj", "down_proj") for t in ("gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")},
    "t5": ("k", "v", "wo"), "mt5": ("k", "v", "wi_1"),
}
IA3_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    t: tuple(n for n in names if n in ("mlp.c_proj", "mlp.dense_4h_to_h", "output.dense", "fc2", "fc_out",
                                       "dense_4h_to_h", "c_proj", "down_proj", "w2", "wo"))
    for t, names in IA3_DEFAULT_TARGETS.items()
}

# top-level attribute names of sequence-classification heads (excluded by "all-linear")
_HEAD_NAMES = ("score", "classifier")


def is_linear_like(module: nn.Module) -> bool:
    """True for the module classes in ``LINEAR_TYPES``."""
    return isinstance(module, LINEAR_TYPES)


def default_targets(model_type: Optional[str], registry: Optional[dict[str, tuple[str, ...]]] = None,
                    what: str = "LoRA") -> tuple[str, ...]:
    """The registry's default target names for a ``config.model_type``.

    Args:
        model_type: ``model.config.model_type``.
        registry: ``DEFAULT_TARGETS`` (LoRA, the default) or ``IA3_DEFAULT_TARGETS``.
        what: the method name used in the error message.

    Raises:
        ValueError: for a model type the registry does not know.
    """
    registry = DEFAULT_TARGETS if registry is None else registry
    if model_type not in registry:
        raise ValueError(f"no default {what} targets for model_type={model_type!r}; pass "
                         f"target_modules=... (known types: {sorted(registry)})")
    return registry[model_type]


def layer_index(name: str, layers_pattern: Union[None, str, Sequence[str]] = None) -> Optional[int]:
    """The layer index in a module name, read as peft reads it (the first match counts).

    ``layers_pattern=None``: the first numbered segment, e.g. 1 in ``model.layers.1.mlp.fc``;
    else the number right after one of the given names, e.g. ``"h"`` -> ``transformer.h.1.attn``.
    """
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in ((layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern):
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def in_layers(name: str, layers: Union[None, int, Sequence[int]],
              layers_pattern: Union[None, str, Sequence[str]] = None) -> bool:
    """Whether module ``name`` lies in ``layers`` (``None``: every module does)."""
    if layers is None:
        return True
    idx = layer_index(name, layers_pattern)
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def name_matches(name: str, spec: Union[str, Sequence[str]]) -> bool:
    """peft's rule: a str is a full regex match; a list entry matches exactly or as a dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def under_any(name: str, prefixes: Iterable[str]) -> bool:
    """True when ``name`` is one of ``prefixes`` or a module nested inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that "all-linear" leaves alone.

    The output embedding (``lm_head``) when the model has one, else a top-level ``score`` or
    ``classifier`` (sequence-classification heads).
    """
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
    if head is None:
        head = next((getattr(model, n) for n in _HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)),
                    None)
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def resolve_targets(model: nn.Module, spec: Union[None, str, tuple[str, ...]],
                    exclude: Sequence[str] = (), embeddings: bool = True,
                    registry: Optional[dict[str, tuple[str, ...]]] = None, what: str = "LoRA",
                    layers: Union[None, int, Sequence[int]] = None,
                    layers_pattern: Union[None, str, Sequence[str]] = None) -> list[str]:
    """Full names of the modules to wrap, in ``named_modules`` order.

    Args:
        model: the base model (no adapter yet).
        spec: ``target_modules`` of the method's config.
        exclude: module names whose subtrees are never targets (``modules_to_save`` heads).
        embeddings: whether ``nn.Embedding`` modules can be wrapped besides ``LINEAR_TYPES``
            (LoRA: yes; "all-linear" still takes linear-like modules only).
        registry: per-model defaults used when ``spec`` is None (``DEFAULT_TARGETS`` by default).
        what: the method name used in error messages.
        layers, layers_pattern: keep only modules in these layer indices (see ``in_layers``);
            like peft, not applied to a regex ``spec``.

    Returns:
        The matched names; each is an instance of one of ``types``.

    Raises:
        ValueError: nothing matched (the message lists the wrappable names that exist), or a
            matched module is of another type.
    """
    types = (*LINEAR_TYPES, nn.Embedding) if embeddings else LINEAR_TYPES
    if spec is None:
        spec = default_targets(getattr(getattr(model, "config", None), "model_type", None), registry, what)
    named = [(n, m) for n, m in model.named_modules() if n and not under_any(n, exclude)]
    if layers is not None and (not isinstance(spec, str) or spec == ALL_LINEAR):
        named = [(n, m) for n, m in named if in_layers(n, layers, layers_pattern)]
    if spec == ALL_LINEAR:
        heads = output_head_names(model)
        found = [n for n, m in named if is_linear_like(m) and n not in heads]
        if not found:
            raise ValueError(f"target_modules='all-linear' found no linear-like module "
                             f"(types {[t.__name__ for t in LINEAR_TYPES]}) outside the output head")
        return found
    matched = [(n, m) for n, m in named if name_matches(n, spec)]
    wrong = [f"{n} ({type(m).__name__})" for n, m in matched if not isinstance(m, types)]
    if wrong:
        raise ValueError(f"target_modules={spec!r} matched modules {what} cannot wrap: {wrong}; "
                         f"it wraps {[t.__name__ for t in types]}")
    if not matched:
        existing = [n for n, m in named if isinstance(m, types)]
        where = "" if layers is None else f" in layers {layers!r}"
        raise ValueError(f"target_modules={spec!r} matched no module{where}; the modules {what} can wrap "
                         f"are: {existing}")
    return [n for n, _ in matched]


def resolve_heads(model: nn.Module, entries: Sequence[str], strict: bool = True) -> list[str]:
    """Full names of the ``modules_to_save`` modules (exact name or dotted suffix; outermost only).

    Args:
        model: the base model.
        entries: ``LoRAConfig.modules_to_save``.
        strict: raise when an entry matches nothing (else skip it).

    Raises:
        ValueError: an entry matched no module (``strict``); the message lists the model's children.
    """
    found: list[str] = []
    for entry in entries:
        hits = [n for n, _ in model.named_modules() if n and name_matches(n, (entry,))]
        if not hits and strict:
            raise ValueError(f"modules_to_save entry {entry!r} matched no module; the model's top-level "
                             f"modules are: {[n for n, _ in model.named_children()]}")
        found += [n for n in hits if n not in found]
    return [n for n in found if not any(n != o and under_any(n, (o,)) for o in found)]
