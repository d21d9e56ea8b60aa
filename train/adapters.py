"""Method name -> how to build, save and load the adapted model (softprompt and lora packages).

- ``head``: freeze the backbone, train only its classification head (the baseline);
- ``prompt`` / ``ptuning``: ``softprompt.PromptModel`` (the head trains too for classification,
  as in peft);
- ``prefix``: ``softprompt.PrefixModel`` (per-layer key/value prefixes; the head trains too);
- ``lora``: ``lora.add_lora`` (for classification the head gets a trained copy, as in peft);
- ``qlora``: ``lora.quantize_model`` (NF4 base) then ``add_lora``;
- ``ia3``: ``lora.add_ia3`` (for classification the head gets a trained copy, as in peft).
- ``bottleneck``: ``lora.add_bottleneck`` (Houlsby / Pfeiffer); for classification the head
  trains too and is saved beside the adapter as ``head_model.safetensors``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, write_json_atomic
from .config import ModelConfig, pattern_dict

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
                            init=cfg.prompt_init,  # P-Tuning: initialises the encoder's input table
                            init_text=cfg.prompt_init_text if cfg.prompt_init == "text" else None,
                            encoder=cfg.encoder, encoder_hidden=cfg.encoder_hidden or None,
                            pool=cfg.prompt_pool if task == "seq_cls" else "backbone")
        return PromptModel(backbone, pcfg, tokenizer=tokenizer, task=task)
    if method == "prefix":
        from softprompt import PrefixConfig, PrefixModel
        xcfg = PrefixConfig(n_virtual=cfg.n_virtual, projection=cfg.prefix_projection,
                            encoder_hidden=cfg.encoder_hidden or None)
        return PrefixModel(backbone, xcfg, task=task)
    if method in ("lora", "qlora", "ia3"):
        import lora
        heads = ((head_name(backbone),) if task == "seq_cls" else ()) + cfg.modules_to_save
        if method == "ia3":
            ff = _targets(cfg.feedforward_modules) if cfg.feedforward_modules else None
            return lora.add_ia3(backbone, lora.IA3Config(target_modules=_targets(cfg.target_modules),
                                                         feedforward_modules=ff, modules_to_save=heads))
        if method == "qlora":
            _quantize(backbone, cfg, heads)
        lcfg = lora.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               target_modules=_targets(cfg.target_modules), modules_to_save=heads,
                               use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, bias=cfg.train_bias,
                               rank_pattern=pattern_dict(cfg, "rank_pattern"),
                               alpha_pattern=pattern_dict(cfg, "alpha_pattern"),
                               layers_to_transform=cfg.layers_to_transform or None,
                               layers_pattern=cfg.layers_pattern or None)
        return lora.add_lora(backbone, lcfg)
    if method == "bottleneck":
        import lora
        extra = {"non_linearity": cfg.non_linearity} if cfg.non_linearity else {}
        bcfg = lora.BottleneckConfig.preset(cfg.adapter_config, reduction_factor=cfg.reduction_factor, **extra)
        lora.add_bottleneck(backbone, bcfg)
        if task == "seq_cls":
            getattr(backbone, head_name(backbone)).requires_grad_(True)
        return backbone
    raise ValueError(f"method={method!r}; expected prompt, ptuning, prefix, lora, qlora, ia3, bottleneck or head")


def _targets(names: tuple):
    """CLI target names -> lora's spec: () -> None (registry default); ("all-linear",) -> "all-linear";
    one entry with regex characters -> that regex; else the names."""
    if not names:
        return None
    if len(names) == 1 and (names[0].lower() == "all-linear" or any(c in names[0] for c in "*()[]|^$+?\\")):
        return names[0].lower() if names[0].lower() == "all-linear" else names[0]
    return names


_NF4_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def nf4_config(cfg: Optional[ModelConfig], task: str, dtype: torch.dtype, heads: tuple = ()):
    """The ``lora.NF4Config`` of method ``qlora`` for a base of ``dtype`` (``cfg``'s NF4 options;
    defaults when None): the heads stay dense, compute in the base dtype unless set."""
    import lora
    cfg = cfg or ModelConfig(method="qlora")
    heads = heads or (_HEADS if task == "seq_cls" else ())
    if cfg.nf4_compute_dtype == "auto":
        compute = None if dtype == torch.float32 else dtype
    else:
        compute = _NF4_DTYPES[cfg.nf4_compute_dtype]
    return lora.NF4Config(skip=cfg.nf4_skip or heads or ("lm_head",), blocksize=cfg.nf4_blocksize,
                          double_quant=cfg.nf4_double_quant, compute_dtype=compute,
                          quant_type=cfg.nf4_quant_type)


def _quantize(backbone: torch.nn.Module, cfg: Optional[ModelConfig], heads: tuple) -> None:
    """The NF4 base of method ``qlora``; a backbone loaded already in 4 bits
    (``load_backbone(quantize=...)``) is left as it is."""
    import lora
    if not qlora_available():
        raise RuntimeError("method 'qlora' needs lora.quantize_model, which this install lacks")
    if any(isinstance(m, lora.NF4Linear) for m in backbone.modules()):
        return
    task = "seq_cls" if heads else "causal_lm"
    q = nf4_config(cfg, task, next(backbone.parameters()).dtype, heads)
    lora.quantize_model(backbone, skip=q.skip, blocksize=q.blocksize, double_quant=q.double_quant,
                        compute_dtype=q.compute_dtype, quant_type=q.quant_type)


def save_adapted(model: torch.nn.Module, method: str, folder: Path) -> Path:
    """Write the method's adapter folder (safetensors + JSON) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if method == "head":
        name = head_name(model)
        tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
                   for k, v in getattr(model, name).state_dict().items()}
        atomic_write(folder / HEAD_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        write_json_atomic(folder / HEAD_CONFIG, {"method": "head", "head": name})
    elif method in ("prompt", "ptuning"):
        from softprompt import save_prompt
        save_prompt(model, folder)
    elif method == "prefix":
        from softprompt import save_prefix
        save_prefix(model, folder)
    elif method in ("lora", "qlora", "ia3"):
        from lora import save_lora
        save_lora(model, folder)
    elif method == "bottleneck":
        from lora import save_bottleneck
        save_bottleneck(model, folder)
        if _head_or_none(model):  # a classifier: its head trained too
            save_adapted(model, "head", folder)
    else:
        raise ValueError(f"method={method!r}; expected prompt, ptuning, prefix, lora, qlora, ia3, bottleneck or head")
    return folder


def _read_head(folder: Path, check_finite: bool) -> tuple[dict, str]:
    """(tensors, head attribute name) of a head adapter folder; errors name the bad file."""
    weights, config = folder / HEAD_WEIGHTS, folder / HEAD_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"adapter folder {folder} has no {path.name}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("head"), str):
        raise ValueError(f"{config}: expected an object with a string 'head' field, got {raw!r}")
    broken = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if check_finite and broken:
        raise ValueError(f"{weights}: tensor(s) {broken} hold NaN or infinite values; the adapter is broken "
                         "(pass check_finite=False to load it anyway)")
    return tensors, raw["head"]


def load_adapted(backbone: torch.nn.Module, method: str, folder: Path,
                 cfg: Optional[ModelConfig] = None, check_finite: bool = True) -> torch.nn.Module:
    """Rebuild the adapted model from a fresh ``backbone`` and a folder from ``save_adapted``.

    ``cfg``: the run's model config, whose NF4 options rebuild a qlora base the same way;
    ``check_finite=False`` loads adapters holding NaN/inf tensors (refused by default).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if method == "head":
        tensors, name = _read_head(folder, check_finite)
        if not isinstance(getattr(backbone, name, None), torch.nn.Module):
            raise ValueError(f"{folder / HEAD_CONFIG}: head={name!r} is not a module of {type(backbone).__name__}")
        head = getattr(backbone, name)
        own = {f"{name}.{k}" for k in head.state_dict()}
        if own != set(tensors):
            raise ValueError(f"{folder}: head keys {sorted(tensors)} do not fit the model's {sorted(own)}")
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()})
        return backbone
    if method in ("prompt", "ptuning"):
        from softprompt import load_prompt
        return load_prompt(backbone, folder, check_finite=check_finite)
    if method == "prefix":
        from softprompt import load_prefix
        return load_prefix(backbone, folder)
    if method in ("lora", "qlora", "ia3"):
        import lora
        if method == "qlora":
            config, _ = lora.io.read_adapter(folder, check_finite=check_finite)  # clear errors before quantizing
            raw = {"modules_to_save": list(config.modules_to_save)}
            heads = tuple(h for h in (raw.get("modules_to_save") or []) if hasattr(backbone, h))
            _quantize(backbone, cfg, heads)
        return lora.load_lora(backbone, folder, check_finite=check_finite)
    if method == "bottleneck":
        import lora
        lora.load_bottleneck(backbone, folder)
        return (load_adapted(backbone, "head", folder, check_finite=check_finite)
                if (folder / HEAD_WEIGHTS).is_file() else backbone)
    raise ValueError(f"method={method!r}; expected prompt, ptuning, prefix, lora, qlora, ia3, bottleneck or head")


def _head_or_none(model: torch.nn.Module) -> str:
    """The classification head's attribute name, or "" when the model has none."""
    return next((name for name, _ in model.named_children() if name in _HEADS), "")


def count_trainable(model: torch.nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_bytes(folder: Optional[Path]) -> int:
    """Size of the adapter weights file(s) in ``folder`` (``*.safetensors``)."""
    if folder is None or not Path(folder).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
