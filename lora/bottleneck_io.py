"""Bottleneck adapter folders: ours (written and read) and AdapterHub's safetensors layout (read).

Ours: ``adapter_model.safetensors`` (keys of ``bottleneck_state_dict``, e.g.
``encoder.layer.0.output.dropout.adapter_down.weight`` [m, d]) + ``adapter_config.json``
(``{"method": "bottleneck", "model_type", "hidden_size", "config": {BottleneckConfig fields}}``).
AdapterHub's (``model.save_adapter(folder, name, use_safetensors=True)``): ``adapter.safetensors``
(keys like ``encoder.layer.0.output.adapters.<name>.adapter_down.0.weight``) + its
``adapter_config.json`` (``{"config": {...}, "model_type", "hidden_size", "version": "adapters.X"}``).
Its ``pytorch_adapter.bin`` is pickle and is never read. Writes are atomic (temp file + rename).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write, atomic_write_text
from .io import copy_checked
from .bottleneck import BottleneckConfig
from .bottleneck_inject import (Layout, add_bottleneck, bottleneck_state, bottleneck_state_dict, bottleneck_tensors,
                                layer_list, layout_of, remove_bottleneck)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
HUB_WEIGHTS_NAME = "adapter.safetensors"
HUB_PICKLE_NAME = "pytorch_adapter.bin"
FORMAT_VERSION = 1

# AdapterHub options this package does not implement, and their neutral values
_HUB_UNSUPPORTED = {"architecture": (None, "bottleneck"), "is_parallel": (False,), "use_gating": (False,),
                    "phm_layer": (False,), "inv_adapter": (None,), "stochastic_depth": (0, 0.0, None)}
_FIELDS = tuple(f.name for f in dataclasses.fields(BottleneckConfig))


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` content of our format for this model's adapter."""
    config = bottleneck_state(model).config
    fields = dataclasses.asdict(config)
    fields["leave_out"] = list(config.leave_out)
    return {"method": "bottleneck", "format_version": FORMAT_VERSION, "model_type": model.config.model_type,
            "hidden_size": int(model.config.hidden_size), "config": fields}


def save_bottleneck(model: nn.Module, folder: Union[str, os.PathLike]) -> Path:
    """Write the adapter folder (ours); returns its path. Existing files are replaced atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").clone().contiguous() for k, v in bottleneck_state_dict(model).items()}
    text = json.dumps(config_dict(model), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG_NAME, text)
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {path.parent} has no {path.name}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {path.parent} has no {path.name}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def _config(fields: Any, where: str) -> BottleneckConfig:
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: 'config' must be a JSON object, got {type(fields).__name__}")
    try:
        return BottleneckConfig(**{k: v for k, v in fields.items() if k in _FIELDS})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _folder_kind(folder: Path) -> tuple[str, dict[str, Any]]:
    """("ours" | "hub", raw config); clear errors for other methods' folders and pickle-only ones."""
    path = folder / CONFIG_NAME
    if not path.is_file() and (folder / HUB_PICKLE_NAME).is_file():
        raise ValueError(f"{folder}: only AdapterHub's pickle file {HUB_PICKLE_NAME} is there; pickle is never "
                         f"loaded. Save with model.save_adapter(folder, name, use_safetensors=True)")
    raw = _read_json(path)
    if raw.get("method") == "bottleneck":
        return "ours", raw
    if str(raw.get("version", "")).startswith("adapters.") and isinstance(raw.get("config"), dict):
        if not (folder / HUB_WEIGHTS_NAME).is_file() and (folder / HUB_PICKLE_NAME).is_file():
            raise ValueError(f"{folder}: AdapterHub folder with only the pickle file {HUB_PICKLE_NAME}; pickle is "
                             f"never loaded. Save with model.save_adapter(folder, name, use_safetensors=True)")
        return "hub", raw
    if "peft_type" in raw:
        raise ValueError(f"{path}: peft_type={raw['peft_type']!r}, this folder is a peft adapter, not a "
                         f"bottleneck adapter (expected method 'bottleneck' or an AdapterHub folder)")
    raise ValueError(f"{path}: method={raw.get('method')!r}, not a bottleneck adapter folder "
                     f"(expected method 'bottleneck' or an AdapterHub folder)")


def _hub_config(raw: dict[str, Any], where: str) -> BottleneckConfig:
    fields = raw["config"]
    for key, neutral in _HUB_UNSUPPORTED.items():
        if fields.get(key) not in neutral:
            raise ValueError(f"{where}: {key}={fields[key]!r} is not supported by lora's bottleneck adapters "
                             f"(expected one of {neutral})")
    return _config(fields, where)


def hub_to_ours(model: nn.Module, tensors: dict[str, torch.Tensor], config: BottleneckConfig,
                where: str) -> dict[str, torch.Tensor]:
    """AdapterHub keys -> ours. ``adapter_down.0`` is the Linear, or the input norm with
    ``ln_before`` (then ``adapter_down.1`` is the Linear and ``adapter_norm_before`` repeats the norm)."""
    layout: Layout = layout_of(model)
    prefix, _ = layer_list(model, layout)
    by_hub = {site.hub: site for site in layout.sites.values()}
    pattern = re.compile(rf"^(?:.*\.)?{re.escape(layout.layers)}\.(\d+)\.(.+?)\.adapters\.([^.]+)\.(.+)$")
    out: dict[str, torch.Tensor] = {}
    names, unknown = set(), []
    for key, value in tensors.items():
        m = pattern.match(key)
        if m is None or m.group(2) not in by_hub:
            unknown.append(key)
            continue
        index, hub, name, param = m.groups()
        names.add(name)
        head, _, rest = param.partition(".")
        if head == "adapter_down" and rest[:2] in ("0.", "1."):
            slot, rest = rest.split(".", 1)
            param = f"adapter_down.{rest}" if slot == ("1" if config.ln_before else "0") else \
                f"adapter_norm_before.{rest}"
        ours = f"{prefix}.{index}.{by_hub[hub].producer}.{param}"
        if ours in out and not torch.equal(out[ours], value):
            raise ValueError(f"{where}: {key} and another key both give {ours} with different values")
        out[ours] = value
    if unknown:
        raise ValueError(f"{where}: keys that are not bottleneck adapter tensors of a "
                         f"{model.config.model_type} layout: {sorted(unknown)}")
    if len(names) > 1:
        raise ValueError(f"{where} holds several AdapterHub adapters {sorted(names)}; expected one")
    return out


def read_bottleneck(model: nn.Module, folder: Union[str, os.PathLike]
                    ) -> tuple[BottleneckConfig, dict[str, torch.Tensor]]:
    """(config, tensors keyed like ``bottleneck_state_dict``) of a folder, ours or AdapterHub's."""
    folder = Path(folder)
    kind, raw = _folder_kind(folder)
    where = str(folder / CONFIG_NAME)
    config = _config(raw.get("config"), where) if kind == "ours" else _hub_config(raw, where)
    for key, have in (("model_type", model.config.model_type), ("hidden_size", int(model.config.hidden_size))):
        if key in raw and raw[key] != have:
            raise ValueError(f"{where}: {key}={raw[key]!r} but the model has {key}={have!r}")
    if kind == "ours":
        return config, _read_tensors(folder / WEIGHTS_NAME)
    path = folder / HUB_WEIGHTS_NAME
    return config, hub_to_ours(model, _read_tensors(path), config, str(path))


def load_bottleneck_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy tensors into the model's adapter; names every missing/unexpected key and shape
    mismatch and changes nothing when there is any."""
    copy_checked(bottleneck_tensors(model), tensors, where)


def load_bottleneck(model: nn.Module, folder: Union[str, os.PathLike]) -> nn.Module:
    """Load a bottleneck adapter folder (ours or AdapterHub's safetensors one) into ``model``.

    On a plain model the folder's config is applied with ``add_bottleneck`` first; on a model
    that already has a bottleneck adapter only the weights are loaded (the configs must be
    equal). On any error the model is left unchanged.

    Raises:
        FileNotFoundError, ValueError: missing/corrupt files, another method's folder, a pickle-only
            AdapterHub folder, unsupported options, another model type or hidden size,
            missing/unexpected keys or shape mismatches.
    """
    config, tensors = read_bottleneck(model, folder)
    if hasattr(model, "_bottleneck_state"):
        have = bottleneck_state(model).config
        if have != config:
            diff = [f"{f}: model {getattr(have, f)!r} vs folder {getattr(config, f)!r}"
                    for f in _FIELDS if getattr(have, f) != getattr(config, f)]
            raise ValueError(f"{folder} holds a different bottleneck setup than the model's adapter: {diff}")
        load_bottleneck_weights(model, tensors, where=str(folder))
        return model
    add_bottleneck(model, config)
    try:
        load_bottleneck_weights(model, tensors, where=str(folder))
    except BaseException:
        remove_bottleneck(model)
        raise
    return model
