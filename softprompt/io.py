"""save_prompt / load_prompt: a peft-loadable adapter folder, plus what peft cannot hold.

Folder layout:
  adapter_model.safetensors  ``prompt_embeddings`` [n_virtual, d] fp32 = the prompt in eval mode
                             (what peft loads); ``base_model.<head>.<param>`` for classification
                             heads (peft's keys); P-Tuning only: ``softprompt.encoder.<param>``,
                             the encoder weights (peft ignores unknown keys) so training resumes.
  adapter_config.json        peft's PROMPT_TUNING / P_TUNING config, ``inference_mode: true``.
  softprompt_config.json     our PromptConfig and task, so a reload rebuilds the same module.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from softprompt.atomic import atomic_write, atomic_write_text
from softprompt.config import PromptConfig
from softprompt.model import PromptModel

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
OUR_CONFIG = "softprompt_config.json"
ENCODER_PREFIX = "softprompt.encoder."
HEAD_PREFIX = "base_model."
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}
PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT", "ids": "RANDOM"}


def adapter_state_dict(pm: PromptModel) -> dict[str, torch.Tensor]:
    """Every tensor ``save_prompt`` writes, detached, fp32 where trained, on CPU."""
    was_training = pm.prompt_encoder.training
    pm.prompt_encoder.eval()  # the saved prompt never carries a dropout mask
    prompt = pm.prompt()  # grad mode left on: CPU LSTM kernels differ in the last bit under no_grad
    pm.prompt_encoder.train(was_training)
    state = {"prompt_embeddings": prompt.detach().to("cpu", torch.float32).contiguous()}
    if pm.config.method == "ptuning":
        for key, value in pm.prompt_encoder.state_dict().items():
            state[ENCODER_PREFIX + key] = value.detach().to("cpu").contiguous()
    if pm.head is not None:
        for key, value in pm.head.state_dict().items():
            state[f"{HEAD_PREFIX}{pm.head_name}.{key}"] = value.detach().to("cpu").contiguous()
    return state


def save_prompt(pm: PromptModel, folder: Union[str, os.PathLike],
                tokenizer_name_or_path: Optional[str] = None) -> None:
    """Write the adapter folder (atomically, file by file).

    Args:
        pm: the model to save.
        folder: created if missing.
        tokenizer_name_or_path: written into peft's config for text inits (peft requires one
            for ``prompt_tuning_init: TEXT``); default: the tokenizer given to PromptModel, if it
            has a ``name_or_path``. Without one a text init is recorded as RANDOM there
            (peft never re-runs the init on load), while softprompt_config.json keeps the truth.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(pm)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _write_json(folder / PEFT_CONFIG, peft_config_dict(pm, tokenizer_name_or_path))
    _write_json(folder / OUR_CONFIG, {"config": pm.config.to_dict(), "task": pm.task, "format_version": 1})


def peft_config_dict(pm: PromptModel, tokenizer_name_or_path: Optional[str] = None) -> dict[str, Any]:
    """peft 0.21.2's adapter_config.json fields for this model."""
    cfg, hf = pm.config, getattr(pm.backbone, "config", None)
    tokenizer_name_or_path = tokenizer_name_or_path or pm.tokenizer_name_or_path
    out: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(pm.backbone, "name_or_path", None) or None,
        "inference_mode": True,
        "modules_to_save": ["classifier", "score"] if pm.task == "seq_cls" else None,
        "num_attention_heads": _first_attr(hf, ("num_attention_heads", "n_head", "num_heads")),
        "num_layers": _first_attr(hf, ("num_hidden_layers", "num_layers", "n_layer")),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.n_virtual,
        "revision": None,
        "task_type": TASK_TYPES[pm.task],
        "token_dim": pm.dim,
    }
    if cfg.method == "prompt":
        init = PEFT_INITS[cfg.init]
        if init == "TEXT" and not tokenizer_name_or_path:
            init = "RANDOM"
        out.update(peft_type="PROMPT_TUNING", prompt_tuning_init=init,
                   prompt_tuning_init_text=cfg.init_text if init == "TEXT" else None,
                   tokenizer_name_or_path=tokenizer_name_or_path if init == "TEXT" else None,
                   tokenizer_kwargs=None)
    else:
        out.update(peft_type="P_TUNING", encoder_dropout=cfg.encoder_dropout,
                   encoder_hidden_size=cfg.encoder_hidden or pm.dim, encoder_num_layers=cfg.encoder_num_layers,
                   encoder_reparameterization_type="MLP" if cfg.encoder == "mlp" else "LSTM")
    return out


# JSON types of the adapter_config.json keys load_prompt reads, as peft writes them
_PEFT_TYPES = {"peft_type": (str,), "task_type": (str, type(None)), "num_virtual_tokens": (int,),
               "token_dim": (int, type(None)), "num_transformer_submodules": (int, type(None)),
               "inference_mode": (bool,)}


def load_prompt(backbone: nn.Module, folder: Union[str, os.PathLike], check_finite: bool = True) -> PromptModel:
    """Rebuild a PromptModel from a folder written by ``save_prompt`` or by peft.

    A peft-saved P-Tuning folder holds only the encoder output, so it loads as a fixed prompt
    table (``method="prompt"``), exactly what peft itself reloads.

    Args:
        backbone: a fresh backbone of the same architecture (it is frozen, never modified).
        folder: the adapter folder.
        check_finite: refuse tensors holding NaN or inf (False loads them anyway).
    Returns:
        the PromptModel in eval mode; its adapter parameters still require grad.
    Raises:
        FileNotFoundError: a missing folder or file (named).
        ValueError: bad JSON, wrong JSON types, missing keys, a truncated or corrupt weights
            file, shapes that do not fit, non-finite tensors; the message names the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    peft_cfg = _read_json(folder / PEFT_CONFIG)
    bad = [f"{k}={peft_cfg[k]!r}" for k, allowed in _PEFT_TYPES.items()
           if k in peft_cfg and type(peft_cfg[k]) not in allowed]  # exact: True is no integer here
    if bad:
        raise ValueError(f"{folder / PEFT_CONFIG}: wrong value type(s) {bad}; expected "
                         + ", ".join(f"{k}: {'/'.join(t.__name__ for t in v)}" for k, v in _PEFT_TYPES.items()))
    peft_type = peft_cfg.get("peft_type")
    if peft_type not in ("PROMPT_TUNING", "P_TUNING"):
        raise ValueError(f"{folder / PEFT_CONFIG}: peft_type={peft_type!r}; expected PROMPT_TUNING or P_TUNING")
    if peft_cfg.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(f"{folder / PEFT_CONFIG}: num_transformer_submodules="
                         f"{peft_cfg['num_transformer_submodules']}; only decoder-only / encoder-only "
                         "backbones (1) are supported")
    state = _read_weights(folder / WEIGHTS)
    if check_finite:
        broken = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if broken:
            raise ValueError(f"{folder / WEIGHTS}: tensor(s) {broken} hold NaN or infinite values; the adapter "
                             "is broken (pass check_finite=False to load it anyway)")
    has_encoder = any(k.startswith(ENCODER_PREFIX) for k in state)
    ours = folder / OUR_CONFIG
    if ours.exists():
        meta = _read_json(ours)
        missing = [k for k in ("config", "task") if k not in meta]
        if missing or not isinstance(meta.get("config"), dict):
            raise ValueError(f"{ours}: missing or malformed key(s) {missing or ['config']}; expected "
                             "{'config': {...}, 'task': ...}")
        try:
            config, task = PromptConfig.from_dict(meta["config"]), meta["task"]
        except (ValueError, TypeError) as err:
            raise ValueError(f"{ours}: {err}") from None
        if task not in TASK_TYPES:
            raise ValueError(f"{ours}: task={task!r}; expected one of {list(TASK_TYPES)}")
    else:
        task = {v: k for k, v in TASK_TYPES.items()}.get(peft_cfg.get("task_type"))
        if task is None:
            raise ValueError(f"{folder / PEFT_CONFIG}: task_type={peft_cfg.get('task_type')!r}; "
                             f"expected one of {list(TASK_TYPES.values())}")
        if "num_virtual_tokens" not in peft_cfg:
            raise ValueError(f"{folder / PEFT_CONFIG}: missing key 'num_virtual_tokens'")
        try:
            config = PromptConfig(method="prompt", n_virtual=peft_cfg["num_virtual_tokens"])
        except ValueError as err:
            raise ValueError(f"{folder / PEFT_CONFIG}: {err}") from None
    if config.method == "ptuning" and not has_encoder:
        raise ValueError(f"{folder}: softprompt_config.json says P-Tuning but no {ENCODER_PREFIX}* keys exist")
    if "prompt_embeddings" not in state and config.method == "prompt":
        raise ValueError(f"{folder / WEIGHTS}: missing key 'prompt_embeddings'")
    dim = int(backbone.get_input_embeddings().weight.shape[1])
    token_dim = peft_cfg.get("token_dim")
    if token_dim is not None and int(token_dim) != dim:
        raise ValueError(f"{folder}: adapter token_dim={token_dim} but the backbone's embedding width is {dim}: "
                         "the adapter was saved for a different model")
    expected_shape = (config.n_virtual, dim)
    if "prompt_embeddings" in state and tuple(state["prompt_embeddings"].shape) != expected_shape:
        raise ValueError(f"{folder / WEIGHTS}: prompt_embeddings has shape {tuple(state['prompt_embeddings'].shape)}; "
                         f"expected {expected_shape} (n_virtual, backbone embedding width)")
    pm = PromptModel(backbone, config, task=task, init_weights=False)
    _load_tensors(pm, state, str(folder / WEIGHTS))
    return pm.eval()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {path.parent} has no {path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {path.parent} has no {path.name}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def copy_checked(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str,
                 optional: frozenset | set = frozenset()) -> None:
    """Copy ``state`` into ``targets`` (name -> model tensor). Every missing, unexpected
    (``optional`` keys may be present) or mis-shaped key is named, and nothing is changed then."""
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets) - set(optional))
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
           for k, v in targets.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad:
        raise ValueError(f"{where} does not fit this model: missing keys {missing}, unexpected keys "
                         f"{unexpected}, shape mismatches {bad}")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key].to(target.dtype))


def _load_tensors(pm: PromptModel, state: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy every tensor in; name every missing, unexpected or mis-shaped key."""
    targets: dict[str, torch.Tensor] = {}
    if pm.config.method == "prompt":
        targets["prompt_embeddings"] = pm.table.weight
    else:
        targets.update({ENCODER_PREFIX + k: v for k, v in pm.prompt_encoder.state_dict(keep_vars=True).items()})
    if pm.head is not None:
        head = pm.head.state_dict(keep_vars=True)
        targets.update({f"{HEAD_PREFIX}{pm.head_name}.{k}": v for k, v in head.items()})
    optional = {"prompt_embeddings"} if pm.config.method == "ptuning" else set()
    copy_checked(targets, state, where, optional)


def _first_attr(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
