"""Which modules get an adapter: linear-like types, per-model defaults, name matching."""
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

# top-level attribute names of sequence-classification heads (excluded by "all-linear")
_HEAD_NAMES = ("score", "classifier")


def is_linear_like(module: nn.Module) -> bool:
    """True for the module classes in ``LINEAR_TYPES``."""
    return isinstance(module, LINEAR_TYPES)


def default_targets(model_type: Optional[str]) -> tuple[str, ...]:
    """The registry's default target names for a ``config.model_type``.

    Raises:
        ValueError: for a model type the registry does not know.
    """
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA targets for model_type={model_type!r}; pass "
                         f"LoRAConfig(target_modules=...) (known types: {sorted(DEFAULT_TARGETS)})")
    return DEFAULT_TARGETS[model_type]


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
                    exclude: Sequence[str] = ()) -> list[str]:
    """Full names of the modules to wrap, in ``named_modules`` order.

    Args:
        model: the base model (no LoRA yet).
        spec: ``LoRAConfig.target_modules``.
        exclude: module names whose subtrees are never targets (``modules_to_save`` heads).

    Returns:
        The matched names; each is a linear-like module.

    Raises:
        ValueError: nothing matched (the message lists the linear-like names that exist), or a
            matched module is not linear-like.
    """
    if spec is None:
        spec = default_targets(getattr(getattr(model, "config", None), "model_type", None))
    named = [(n, m) for n, m in model.named_modules() if n and not under_any(n, exclude)]
    if spec == ALL_LINEAR:
        heads = output_head_names(model)
        found = [n for n, m in named if is_linear_like(m) and n not in heads]
        if not found:
            raise ValueError(f"target_modules='all-linear' found no linear-like module "
                             f"(types {[t.__name__ for t in LINEAR_TYPES]}) outside the output head")
        return found
    matched = [(n, m) for n, m in named if name_matches(n, spec)]
    wrong = [f"{n} ({type(m).__name__})" for n, m in matched if not is_linear_like(m)]
    if wrong:
        raise ValueError(f"target_modules={spec!r} matched modules LoRA cannot wrap: {wrong}; "
                         f"linear-like types are {[t.__name__ for t in LINEAR_TYPES]}")
    if not matched:
        existing = [n for n, m in named if is_linear_like(m)]
        raise ValueError(f"target_modules={spec!r} matched no module; the linear-like modules are: {existing}")
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
