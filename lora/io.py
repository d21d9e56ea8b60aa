"""Adapter folders: ``adapter_model.safetensors`` + ``adapter_config.json`` in peft's format,
for every method in ``lora`` (peft_type ``LORA`` and ``IA3``).

Keys are ``base_model.model.<key of adapter_tensors>``, e.g.
``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` [r, in] or ``….ia3_l``. Only safetensors and
JSON are read or written (no pickle); every file is written to a temp file then renamed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import ia3
from .atomic import atomic_write, atomic_write_text
from .config import ALL_LINEAR, LoRAConfig
from .inject import _wrappers, adapter_tensors, add_lora, lora_state, remove_lora
from .heads import TrainedCopy
from .embedding import LoRAEmbedding
from .layer import LoRALinear
from .targets import DEFAULT_TARGETS, resolve_heads

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the peft release whose format this writes

# peft config keys with behaviour this package does not implement, and their neutral values
_UNSUPPORTED = {
    "exclude_modules": (None, [], ""), "lora_bias": (False, None), "layer_replication": (None,),
    "target_parameters": (None, []), "trainable_token_indices": (None,), "use_qalora": (False, None),
    "use_bdlora": (None, False), "alora_invocation_tokens": (None,), "arrow_config": (None,),
    "velora_config": (None,), "monteclora_config": (None,), "kasa_config": (None,),
}


_STR, _NONE, _BOOL, _LIST, _DICT = (str,), (type(None),), (bool,), (list,), (dict,)
# JSON types of the adapter_config.json keys this package reads, as peft writes them (a string
# "false" is not a boolean: bool("false") would be True)
_FIELD_TYPES = {
    "peft_type": _STR, "task_type": _STR + _NONE, "base_model_name_or_path": _STR + _NONE,
    "revision": _STR + _NONE, "peft_version": _STR + _NONE, "inference_mode": _BOOL,
    "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float),
    "target_modules": _STR + _LIST + _NONE, "use_rslora": _BOOL, "use_dora": _BOOL, "bias": _STR,
    "modules_to_save": _LIST + _NONE, "fan_in_fan_out": _BOOL, "init_lora_weights": _BOOL + _STR,
    "layers_pattern": _STR + _LIST + _NONE, "loftq_config": _DICT,
    "rank_pattern": _DICT + _NONE, "alpha_pattern": _DICT + _NONE, "layers_to_transform": (int,) + _LIST + _NONE,
    "feedforward_modules": _STR + _LIST + _NONE,
}
_JSON_NAMES = {str: "string", type(None): "null", bool: "boolean", int: "integer", float: "number",
               list: "list", dict: "object"}


def check_field_types(raw: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming every key of ``raw`` whose JSON type is not the one peft writes."""
    bad = []
    for key, allowed in _FIELD_TYPES.items():
        if key in raw and type(raw[key]) not in allowed:  # exact types: True is not an integer here
            want = " or ".join(_JSON_NAMES[t] for t in allowed)
            bad.append(f"{key}={raw[key]!r} (a JSON {_JSON_NAMES.get(type(raw[key]), type(raw[key]).__name__)}, "
                       f"expected {want})")
    for key in ("target_modules", "modules_to_save", "feedforward_modules"):
        if isinstance(raw.get(key), list) and not all(isinstance(x, str) for x in raw[key]):
            bad.append(f"{key}={raw[key]!r} (expected a list of strings)")
    if bad:
        raise ValueError(f"{where}: wrong value type(s): {'; '.join(bad)}")


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise a ValueError naming the tensors that hold NaN or infinite values."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{where}: tensor(s) {sorted(bad)} hold NaN or infinite values; the adapter is "
                         f"broken (pass check_finite=False to load it anyway)")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (detached), keyed like peft's file without ``base_model.model.``."""
    return {k: p.detach() for k, p in adapter_tensors(model).items()}


def _task_type(model: nn.Module) -> Union[str, None]:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def peft_config_dict(model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` content peft 0.21.2 reads for this model's adapter."""
    config = lora_state(model).config
    common = {"peft_version": PEFT_VERSION, "task_type": _task_type(model),
              "base_model_name_or_path": getattr(model, "name_or_path", None) or None, "revision": None,
              "inference_mode": True, "auto_mapping": None}
    if isinstance(config, ia3.IA3Config):
        return {**common, **ia3.peft_fields(model, config, _wrappers(model))}
    targets: Any = config.target_modules
    if targets is None:
        targets = list(DEFAULT_TARGETS[model.config.model_type])
    elif targets == ALL_LINEAR:  # like peft: the resolved full names
        targets = sorted(n for n, m in _wrappers(model) if isinstance(m, LoRALinear))
    elif not isinstance(targets, str):
        targets = list(targets)
    fan_in_fan_out = any(m.fan_in_fan_out for _, m in _wrappers(model) if isinstance(m, LoRALinear))
    return {
        "peft_type": "LORA", "peft_version": PEFT_VERSION, "task_type": _task_type(model),
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None, "revision": None,
        "inference_mode": True, "auto_mapping": None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": targets, "use_rslora": config.use_rslora, "use_dora": config.use_dora,
        "bias": config.bias, "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "lora_bias": False,
        "exclude_modules": None, "layer_replication": None,
        "layers_to_transform": _listed(config.layers_to_transform), "layers_pattern": _listed(config.layers_pattern),
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "target_parameters": None,
        "trainable_token_indices": None, "use_qalora": False, "loftq_config": {},
    }


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def save_lora(model: nn.Module, folder: Union[str, os.PathLike]) -> Path:
    """Write the adapter as a folder that ``peft.PeftModel.from_pretrained`` loads.

    Args:
        model: a model with LoRA (see ``add_lora``).
        folder: created if missing; existing adapter files in it are replaced atomically.

    Returns:
        The folder path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + k: v.to("cpu").clone().contiguous() for k, v in lora_state_dict(model).items()}
    text = json.dumps(peft_config_dict(model), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG_NAME, text)
    return folder


def config_from_peft(raw: dict[str, Any], where: str = "adapter_config.json") -> Union[LoRAConfig, ia3.IA3Config]:
    """A LoRAConfig (or IA3Config) from peft's config dict; rejects other methods and unsupported options."""
    check_field_types(raw, where)
    kind = raw.get("peft_type")
    if kind == "IA3":
        return ia3.config_from_peft(raw, where)
    if kind != "LORA":
        raise ValueError(f"{where}: peft_type={kind!r}, this folder is not a LoRA adapter "
                         f"(expected peft_type 'LORA' or 'IA3')")
    for key, neutral in _UNSUPPORTED.items():
        if raw.get(key) not in neutral:
            raise ValueError(f"{where}: {key}={raw[key]!r} is not supported by lora (expected one of {neutral})")
    try:
        return LoRAConfig(r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                          target_modules=raw.get("target_modules"), use_rslora=raw.get("use_rslora", False),
                          use_dora=raw.get("use_dora", False), bias=raw.get("bias", "none"),
                          modules_to_save=tuple(raw.get("modules_to_save") or ()),
                          rank_pattern=raw.get("rank_pattern") or (), alpha_pattern=raw.get("alpha_pattern") or (),
                          layers_to_transform=raw.get("layers_to_transform"), layers_pattern=raw.get("layers_pattern"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {folder} has no {CONFIG_NAME}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {folder} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def read_adapter(folder: Union[str, os.PathLike],
                 check_finite: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config, tensors) of a LoRA adapter folder (ours or peft's), with clear errors for missing
    or corrupt files, wrong JSON types, other methods, unsupported options and (unless
    ``check_finite=False``) NaN/inf tensors. The config is checked first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist (expected {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} in it)")
    config = config_from_peft(_read_config(folder), where=str(folder / CONFIG_NAME))
    tensors = _read_tensors(folder)
    if check_finite:
        _check_finite(tensors, str(folder / WEIGHTS_NAME))
    return config, tensors


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy peft-keyed tensors into a model with LoRA; names every missing/unexpected key and every
    shape mismatch and changes nothing when there is any."""
    own = adapter_tensors(model)
    given: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if key.endswith(".lora_magnitude_vector.weight"):  # older peft DoRA key
            key = key[: -len(".weight")]
        given[key] = value
    # bias="all" makes peft also write its head wrapper's internals (<head>.modules_to_save.bias,
    # <head>.original_module.bias); the trained copy's own keys (<head>.bias) are the ones that count
    heads = [n for n, m in _wrappers(model) if isinstance(m, TrainedCopy)]
    inner = tuple(f"{h}.{part}." for h in heads for part in ("modules_to_save", "original_module"))
    given = {k: v for k, v in given.items() if not k.startswith(inner)}
    # peft also saves the full table of an adapted embedding (<p>.base_layer.weight); like peft,
    # it is loaded into the base embedding when present
    optional = {f"{n}.base_layer.weight": m.base_layer.weight for n, m in _wrappers(model)
                if isinstance(m, LoRAEmbedding)}
    own = {**own, **{k: w for k, w in optional.items() if k in given}}
    copy_checked(own, given, where)


def copy_checked(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``given`` into ``own`` (name -> model tensor); names every missing/unexpected key and
    shape mismatch and changes nothing when there is any."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    shapes = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(given)) if given[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where} does not fit the model: missing keys {missing}; unexpected keys {unexpected}; "
                         f"shape mismatches {shapes}")
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(given[key])


def load_lora(model: nn.Module, folder: Union[str, os.PathLike], check_finite: bool = True) -> nn.Module:
    """Load an adapter folder (ours or peft's) into ``model``.

    On a plain base model the folder's config is applied with ``add_lora`` first; on a model
    that already has LoRA only the weights are loaded. On any error the model is left unchanged.
    A model whose LoRA is merged is refused (the loaded delta would not reach the weights, and a
    later unmerge would subtract one they never held): ``unmerge_lora`` it first.

    Args:
        model: a plain base model, or one with (unmerged) LoRA.
        folder: the adapter folder.
        check_finite: refuse tensors holding NaN or inf (False loads them anyway).

    Returns:
        The same ``model`` object.

    Raises:
        FileNotFoundError, ValueError: missing files, a truncated/corrupt safetensors file, a
            folder of another method, unsupported options, missing/unexpected keys or shapes,
            non-finite tensors, a merged model.
    """
    config, tensors = read_adapter(folder, check_finite=check_finite)
    if hasattr(model, "_lora_state"):
        merged = [n for n, m in _wrappers(model) if isinstance(m, LoRALinear) and m.merged]
        if merged:
            raise ValueError(f"cannot load {folder} into a model whose LoRA is merged into the base weights "
                             f"({len(merged)} layers, e.g. {merged[0]}); call unmerge_lora(model) first")
        have = lora_state(model).config
        if type(have) is not type(config):
            raise ValueError(f"{folder} holds a {type(config).__name__} adapter but the model has a "
                             f"{type(have).__name__} one")
        fields = ("r", "alpha", "use_rslora", "use_dora", "bias", "rank_pattern", "alpha_pattern") \
            if isinstance(config, LoRAConfig) else ()
        diff = [f"{f}: model {getattr(have, f)!r} vs folder {getattr(config, f)!r}"
                for f in fields if getattr(have, f) != getattr(config, f)]
        if diff:
            raise ValueError(f"{folder} holds a different LoRA setup than the model's adapter: {diff}")
        load_adapter_weights(model, tensors, where=str(folder))
        return model
    # peft lists head names that may not exist in this model (e.g. "score" on BERT)
    heads = tuple(e for e in config.modules_to_save if resolve_heads(model, (e,), strict=False))
    config = dataclasses.replace(config, modules_to_save=heads)
    (ia3.add_ia3 if isinstance(config, ia3.IA3Config) else add_lora)(model, config)
    try:
        load_adapter_weights(model, tensors, where=str(folder))
    except BaseException:
        remove_lora(model)
        raise
    return model
