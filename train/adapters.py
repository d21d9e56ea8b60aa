"""Method name -> how to build, save and load the adapted model (softprompt and lora packages).

- ``head``: freeze the backbone, train only its classification head (the baseline);
- ``prompt`` / ``ptuning``: ``softprompt.PromptModel`` (the head trains too for classification,
  as in peft);
- ``lora``: ``lora.add_lora`` (for classification the head gets a trained copy, as in peft);
- ``qlora``: ``lora.quantize_model`` (NF4 base) then ``add_lora``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig

__all__ = ["build_adapted", "save_adapted", "load_adapted", "count_trainable", "adapter_bytes",
           "qlora_available", "head_name", "nf4_config"]

log = logging.getLogger(__name__)
_HEADS = ("classifier", "score")  # classification head attribute names in transformers
HEAD_WEIGHTS, HEAD_CONFIG = "head_model.safetensors", "head_config.json"


def head_name(backbone: torch.nn.Module) -> str:
    """The attribute name of a ``...ForSequenceClassification`` head."""
    for name, _ in backbone.named_children():
        if name in _HEADS:
            return name
    raise ValueError(f"no classification head ({' or '.join(_HEADS)}) on {type(backbone).__name__}")


def qlora_available() -> bool:
    """Whether the lora package exposes ``quantize_model`` (the NF4 base)."""
    import lora
    return hasattr(lora, "quantize_model")


def nf4_config(task: str, dtype: torch.dtype):
    """QLoRA's NF4 settings for a base of ``dtype``: heads stay dense, compute in the base dtype."""
    import lora
    return lora.NF4Config(skip=_HEADS if task == "seq_cls" else ("lm_head",),
                          compute_dtype=None if dtype == torch.float32 else dtype)


def _quantize_once(backbone: torch.nn.Module, task: str) -> None:
    """NF4 for a dense backbone; a backbone loaded already quantized is left as it is."""
    import lora
    if not qlora_available():
        raise RuntimeError("method 'qlora' needs lora.quantize_model, which this install lacks")
    if any(isinstance(m, lora.NF4Linear) for m in backbone.modules()):
        return
    cfg = nf4_config(task, next(backbone.parameters()).dtype)
    lora.quantize_model(backbone, skip=cfg.skip, compute_dtype=cfg.compute_dtype)


def build_adapted(backbone: torch.nn.Module, cfg: ModelConfig, task: str, tokenizer=None) -> torch.nn.Module:
    """Wrap or modify ``backbone`` for ``cfg.method``; only the adapter parameters train.

    Args:
        backbone: a Hugging Face model (``...ForSequenceClassification`` for task "seq_cls",
            ``...ForCausalLM`` for "causal_lm").
        cfg: method and its knobs.
        task: "seq_cls" or "causal_lm".
        tokenizer: needed by the text init of prompt tuning.
    Returns:
        The model to train (forward(**batch) -> output with .loss/.logits).
    """
    model = _build(backbone, cfg, task, tokenizer)
    for p in model.parameters():  # adapters train in fp32 even on a 16-bit base (AMP keeps fp32 masters)
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return model


def _build(backbone: torch.nn.Module, cfg: ModelConfig, task: str, tokenizer) -> torch.nn.Module:
    method = cfg.method
    if method == "head":
        if task != "seq_cls":
            raise ValueError("method 'head' trains a classification head; it needs task=classify")
        backbone.requires_grad_(False)
        getattr(backbone, head_name(backbone)).requires_grad_(True)
        return backbone
    if method in ("prompt", "ptuning"):
        from softprompt import PromptConfig, PromptModel
        pcfg = PromptConfig(method=method, n_virtual=cfg.n_virtual,
                            init=cfg.prompt_init if method == "prompt" else "random",
                            init_text=cfg.prompt_init_text if cfg.prompt_init == "text" and method == "prompt" else None,
                            encoder=cfg.encoder, encoder_hidden=cfg.encoder_hidden or None,
                            pool=cfg.prompt_pool if task == "seq_cls" else "backbone")
        return PromptModel(backbone, pcfg, tokenizer=tokenizer, task=task)
    if method in ("lora", "qlora"):
        import lora
        heads = (head_name(backbone),) if task == "seq_cls" else ()
        if method == "qlora":
            _quantize_once(backbone, task)
        lcfg = lora.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               target_modules=cfg.target_modules or None, modules_to_save=heads)
        return lora.add_lora(backbone, lcfg)
    raise ValueError(f"method={method!r}; expected prompt, ptuning, lora, qlora or head")


def _atomic_save(tensors: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_adapted(model: torch.nn.Module, method: str, folder: Path) -> Path:
    """Write the method's adapter folder (safetensors + JSON) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if method == "head":
        name = head_name(model)
        tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
                   for k, v in getattr(model, name).state_dict().items()}
        _atomic_save(tensors, folder / HEAD_WEIGHTS)
        from .checkpoint import write_json_atomic
        write_json_atomic(folder / HEAD_CONFIG, {"method": "head", "head": name})
    elif method in ("prompt", "ptuning"):
        from softprompt import save_prompt
        save_prompt(model, folder)
    elif method in ("lora", "qlora"):
        from lora import save_lora
        save_lora(model, folder)
    else:
        raise ValueError(f"method={method!r}; expected prompt, ptuning, lora, qlora or head")
    return folder


def load_adapted(backbone: torch.nn.Module, method: str, folder: Path) -> torch.nn.Module:
    """Rebuild the adapted model from a fresh ``backbone`` and a folder from ``save_adapted``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if method == "head":
        tensors = load_file(folder / HEAD_WEIGHTS)
        name = json.loads((folder / HEAD_CONFIG).read_text())["head"]
        head = getattr(backbone, name)
        own = {f"{name}.{k}" for k in head.state_dict()}
        if own != set(tensors):
            raise ValueError(f"{folder}: head keys {sorted(tensors)} do not fit the model's {sorted(own)}")
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()})
        return backbone
    if method in ("prompt", "ptuning"):
        from softprompt import load_prompt
        return load_prompt(backbone, folder)
    if method in ("lora", "qlora"):
        import lora
        if method == "qlora":
            raw = json.loads((folder / "adapter_config.json").read_text())
            heads = tuple(h for h in (raw.get("modules_to_save") or []) if hasattr(backbone, h))
            _quantize_once(backbone, "seq_cls" if heads else "causal_lm")
        return lora.load_lora(backbone, folder)
    raise ValueError(f"method={method!r}; expected prompt, ptuning, lora, qlora or head")


def count_trainable(model: torch.nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_bytes(folder: Optional[Path]) -> int:
    """Size of the adapter weights file(s) in ``folder`` (``*.safetensors``)."""
    if folder is None or not Path(folder).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
