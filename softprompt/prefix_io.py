"""save_prefix / load_prefix: a peft-loadable PREFIX_TUNING folder, plus what peft cannot hold.

Folder layout:
  adapter_model.safetensors  ``prompt_embeddings`` [n_virtual, 2 * layers * kv_width] fp32 = the
                             prefixes in eval mode (what peft loads); ``base_model.<head>.<param>``
                             for classification heads (peft's keys); with the projection only:
                             ``softprompt.prefix_encoder.<param>``, the table and MLP weights (peft
                             ignores unknown keys) so training resumes.
  adapter_config.json        peft's PREFIX_TUNING config, ``inference_mode: true``.
  prefix_config.json         our PrefixConfig and task, so a reload rebuilds the same module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import save_file
from torch import nn

from softprompt.atomic import atomic_write, atomic_write_text
from softprompt.io import HEAD_PREFIX, PEFT_CONFIG, TASK_TYPES, WEIGHTS, _read_weights, copy_checked
from softprompt.prefix import PrefixModel
from softprompt.prefix_config import PrefixConfig
from softprompt.prefix_encoder import prefix_geometry

OUR_PREFIX_CONFIG = "prefix_config.json"
PREFIX_ENCODER_PREFIX = "softprompt.prefix_encoder."
_OTHER_LOADERS = {"PROMPT_TUNING": "softprompt.load_prompt", "P_TUNING": "softprompt.load_prompt",
                  "LORA": "lora.load_lora"}


def prefix_state_dict(pm: PrefixModel) -> dict[str, torch.Tensor]:
    """Every tensor ``save_prefix`` writes, detached, on CPU."""
    with torch.no_grad():
        flat = pm.prefix()  # the encoder has no dropout of its own: train/eval give the same tensor
    state = {"prompt_embeddings": flat.detach().to("cpu", torch.float32).contiguous()}
    if pm.config.projection:
        for key, value in pm.prefix_encoder.state_dict().items():
            state[PREFIX_ENCODER_PREFIX + key] = value.detach().to("cpu").contiguous()
    if pm.head is not None:
        for key, value in pm.head.state_dict().items():
            state[f"{HEAD_PREFIX}{pm.head_name}.{key}"] = value.detach().to("cpu").contiguous()
    return state


def peft_prefix_config(pm: PrefixModel) -> dict[str, Any]:
    """peft 0.21.2's adapter_config.json fields for this model (token_dim is the kv width)."""
    cfg, geo = pm.config, pm.geometry
    return {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(pm.backbone, "name_or_path", None) or None,
        "encoder_hidden_size": cfg.encoder_hidden or geo.kv_width,
        "inference_mode": True,
        "init_weights": "zero" if cfg.init == "zero" else None,
        "modules_to_save": ["classifier", "score"] if pm.task == "seq_cls" else None,
        "num_attention_heads": geo.kv_heads,
        "num_layers": geo.n_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.n_virtual,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": cfg.projection,
        "revision": None,
        "task_type": TASK_TYPES[pm.task],
        "token_dim": geo.kv_width,
    }


def save_prefix(pm: PrefixModel, folder: Union[str, os.PathLike]) -> None:
    """Write the adapter folder (atomically, file by file); created if missing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = prefix_state_dict(pm)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_json(folder / PEFT_CONFIG, peft_prefix_config(pm))
    _write_json(folder / OUR_PREFIX_CONFIG, {"config": pm.config.to_dict(), "task": pm.task, "format_version": 1})


def load_prefix(backbone: nn.Module, folder: Union[str, os.PathLike]) -> PrefixModel:
    """Rebuild a PrefixModel from a folder written by ``save_prefix`` or by peft.

    A peft-saved folder holds only the prefixes (peft bakes any projection into them), so it
    loads as a fixed table (``projection=False``), exactly what peft itself reloads.

    Args:
        backbone: a fresh backbone of the architecture the prefixes were trained on.
        folder: the adapter folder.
    Returns:
        the PrefixModel in eval mode; its adapter parameters still require grad.
    Raises:
        ValueError: a folder of another method, a backbone of another shape, or tensors that
            do not fit (each named).
    """
    folder = Path(folder)
    peft_cfg = _read_json(folder / PEFT_CONFIG)
    peft_type = peft_cfg.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        hint = f"; load it with {_OTHER_LOADERS[peft_type]}" if peft_type in _OTHER_LOADERS else ""
        raise ValueError(f"{folder / PEFT_CONFIG}: peft_type={peft_type!r}; expected PREFIX_TUNING{hint}")
    if peft_cfg.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{folder / PEFT_CONFIG}: num_transformer_submodules="
                         f"{peft_cfg['num_transformer_submodules']}; only 1 (no encoder-decoder) is supported")
    geo = prefix_geometry(backbone)
    for field, ours in (("num_layers", geo.n_layers), ("num_attention_heads", geo.kv_heads),
                        ("token_dim", geo.kv_width)):
        if peft_cfg.get(field) is not None and peft_cfg[field] != ours:
            raise ValueError(f"{folder / PEFT_CONFIG}: {field}={peft_cfg[field]!r} but the backbone has {ours} "
                             "(layers, key/value heads, key/value width): the adapter was saved for another model")
    ours_path = folder / OUR_PREFIX_CONFIG
    if ours_path.exists():
        meta = _read_json(ours_path)
        config, task = PrefixConfig.from_dict(meta.get("config", {})), meta.get("task")
        if task not in TASK_TYPES:
            raise ValueError(f"{ours_path}: task={task!r}; expected one of {list(TASK_TYPES)}")
    else:
        task = {v: k for k, v in TASK_TYPES.items()}.get(peft_cfg.get("task_type"))
        if task is None:
            raise ValueError(f"{folder / PEFT_CONFIG}: task_type={peft_cfg.get('task_type')!r}; "
                             f"expected one of {list(TASK_TYPES.values())}")
        n_virtual = peft_cfg.get("num_virtual_tokens")
        if isinstance(n_virtual, bool) or not isinstance(n_virtual, int):
            raise ValueError(f"{folder / PEFT_CONFIG}: num_virtual_tokens={n_virtual!r}; expected an int")
        config = PrefixConfig(n_virtual=n_virtual)
    state = _read_weights(folder / WEIGHTS)
    for key, value in state.items():
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError(f"{folder / WEIGHTS}: {key} is {value.dtype} with non-finite or non-float values; "
                             "expected finite floating-point tensors")
    expected = (config.n_virtual, geo.width)
    got = tuple(state["prompt_embeddings"].shape) if "prompt_embeddings" in state else None
    if got != expected:
        raise ValueError(f"{folder / WEIGHTS}: prompt_embeddings has shape {got}; expected {expected} "
                         f"(n_virtual, 2 * {geo.n_layers} layers * kv width {geo.kv_width})")
    pm = PrefixModel(backbone, config, task=task)
    _load_tensors(pm, state, folder)
    return pm.eval()


def _load_tensors(pm: PrefixModel, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy every tensor in; name every missing, unexpected or mis-shaped key."""
    targets: dict[str, torch.Tensor] = {}
    if pm.config.projection:
        targets.update({PREFIX_ENCODER_PREFIX + k: v for k, v in pm.prefix_encoder.state_dict(keep_vars=True).items()})
    else:
        targets["prompt_embeddings"] = pm.prefix_encoder.embedding.weight
    if pm.head is not None:
        head = pm.head.state_dict(keep_vars=True)
        targets.update({f"{HEAD_PREFIX}{pm.head_name}.{k}": v for k, v in head.items()})
    optional = {"prompt_embeddings"}  # always written; with the projection it is the MLP's output
    copy_checked(targets, state, str(folder / WEIGHTS), optional)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected an adapter folder with {path.name}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")

