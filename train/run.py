"""One training run from a ``RunConfig``: prepare, score before, train, score after, summarize.

Everything that can be wrong with the inputs (config values, data file, model folder) is
checked in ``prepare`` before anything is written, so a bad run leaves no half-made folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import adapters
from .checkpoint import write_json_atomic
from .config import RunConfig
from .data import (PadCollator, classification_to_instruction, encode_instruction, encode_text,
                   read_records, resolve_data, split_records)
from .evaluate import answer_accuracy, answer_token_ids, classify_accuracy, eval_loss
from .loop import resolve_device, train
from .models import load_backbone, load_tokenizer, resolve_model

__all__ = ["Prepared", "prepare", "load_base", "build_model", "score", "run", "RUN_CONFIG"]

log = logging.getLogger(__name__)
RUN_CONFIG = "config.json"


@dataclass
class Prepared:
    cfg: RunConfig
    folder: Path                    # the backbone's Hugging Face folder
    tokenizer: object
    task: str                       # "seq_cls" or "causal_lm"
    train: list[dict]               # encoded training examples
    held: list[dict]                # encoded held-out examples
    answer_ids: Optional[list[int]]  # causal LM with labelled data: one token per class


def _is_causal(folder: Path) -> bool:
    cfg = json.loads((folder / "config.json").read_text())
    return any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or [])


def prepare(cfg: RunConfig) -> Prepared:
    """Resolve the model and data, read, split and encode; writes nothing.

    Raises:
        FileNotFoundError / DataError / ValueError naming the bad input.
    """
    data_path = resolve_data(cfg.data.data)
    folder = resolve_model(cfg.model.model)
    records = read_records(data_path, cfg.data.num_labels)
    causal = _is_causal(folder)
    instruct_file = "instruction" in records[0]
    task = cfg.data.task
    if task == "auto":
        task = "instruct" if (causal or instruct_file) else "classify"
    if task == "classify" and instruct_file:
        raise ValueError(f"task=classify needs a text,label CSV; {data_path} holds instruction records")
    if cfg.model.method == "head" and task != "classify":
        raise ValueError("method 'head' trains a classification head; it needs task=classify and a CSV")
    tokenizer = load_tokenizer(folder)
    train_recs, held_recs = split_records(records, cfg.data.eval_fraction, cfg.loop.seed)
    if cfg.data.max_train:
        train_recs = train_recs[:cfg.data.max_train]
    if cfg.data.max_eval:
        held_recs = held_recs[:cfg.data.max_eval]
    answer_ids = None
    n = cfg.data.max_length
    if task == "classify":
        enc_train = [encode_text(tokenizer, r, n) for r in train_recs]
        enc_held = [encode_text(tokenizer, r, n) for r in held_recs]
    else:
        if not instruct_file:
            answer_ids = answer_token_ids(tokenizer, cfg.data.label_words)
            train_recs = classification_to_instruction(train_recs, cfg.data.instruction, cfg.data.label_words)
            held_recs = classification_to_instruction(held_recs, cfg.data.instruction, cfg.data.label_words)
        enc_train = [dict(encode_instruction(tokenizer, r, n), **({"label": r["label"]} if "label" in r else {}))
                     for r in train_recs]
        enc_held = [dict(encode_instruction(tokenizer, r, n), **({"label": r["label"]} if "label" in r else {}))
                    for r in held_recs]
        kept = [e for e in enc_train if any(x != -100 for x in e["labels"])]
        if len(kept) < len(enc_train):
            log.warning("%d training examples lost their whole answer to max_length=%d and are skipped",
                        len(enc_train) - len(kept), n)
        enc_train = kept
        if not enc_train:
            raise ValueError(f"no training example keeps an answer within max_length={n}")
    return Prepared(cfg=cfg, folder=folder, tokenizer=tokenizer,
                    task="seq_cls" if task == "classify" else "causal_lm",
                    train=enc_train, held=enc_held, answer_ids=answer_ids)


BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_base(cfg: RunConfig, folder: Path, task: str,
              device: Optional[torch.device] = None) -> torch.nn.Module:
    """The run's frozen backbone, streamed onto ``device`` in ``--base-dtype``; for ``qlora``
    its linear layers (all but the heads) are quantized to NF4 as they are read."""
    dtype = BASE_DTYPES[cfg.model.base_dtype]
    quantize = None
    if cfg.model.method == "qlora":
        quantize = adapters.nf4_config(task, dtype)
    return load_backbone(folder, task, num_labels=cfg.data.num_labels, dtype=dtype,
                         quantize=quantize, device=device or "cpu")


def build_model(p: Prepared, device: Optional[torch.device] = None) -> torch.nn.Module:
    """The backbone (seeded, so a new classifier head is the same each run) with its adapter.

    The backbone is loaded straight onto ``device``, so QLoRA quantizes there.
    """
    torch.manual_seed(p.cfg.loop.seed)
    backbone = load_base(p.cfg, p.folder, p.task, device)
    return adapters.build_adapted(backbone, p.cfg.model, p.task, p.tokenizer)


def score(model: torch.nn.Module, p: Prepared, device: torch.device) -> dict:
    """Held-out metrics: accuracy (when there are labels) and eval loss where defined."""
    pad = p.tokenizer.pad_token_id
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.cfg.loop.precision)
    # score under the training precision: what was trained is what is measured
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        if p.task == "seq_cls":
            return classify_accuracy(model, p.held, pad, device)
        if p.answer_ids is not None:  # labelled: accuracy of the answer word (one position per prompt)
            return answer_accuracy(model, p.held, p.answer_ids, pad, device)
        return eval_loss(model, p.held, pad, device)


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, prepared: Optional[Prepared] = None) -> dict:
    """Train one adapter and write the run folder; returns the summary.

    The folder gets ``config.json``, ``metrics.jsonl``, ``loss.png``, ``checkpoints/``,
    ``adapter/`` (the method's adapter) and ``summary.json``.
    """
    p = prepared or prepare(cfg)
    run_dir = Path(run_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
    if main and run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise FileExistsError(f"run folder {run_dir} is not empty; pick another --out or pass --resume")
    device = resolve_device(cfg.loop.device)
    model = build_model(p, device)
    before = score(model, p, device) if not resume else {}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / RUN_CONFIG, {**cfg.to_dict(), "effective_lr": cfg.lr})
    method = cfg.model.method
    t0 = time.perf_counter()
    result = train(model, p.train, PadCollator(p.tokenizer.pad_token_id, cfg.data.padding_side), cfg.loop,
                   run_dir, cfg.lr, evaluate=lambda m: score(m, p, device),
                   write_adapter=lambda m, f: adapters.save_adapted(m, method, f),
                   resume=resume, extra_state={"run": cfg.to_dict()})
    seconds = time.perf_counter() - t0
    after = score(model, p, device)
    adapter_dir = adapters.save_adapted(model, method, run_dir / "adapter") if main else None
    summary = {"method": method, "model": cfg.model.model, "data": cfg.data.data, "task": p.task,
               "trainable_params": adapters.count_trainable(model),
               "adapter_bytes": adapters.adapter_bytes(adapter_dir), "steps": result.steps,
               "s_per_step": result.seconds_per_step, "train_seconds": seconds,
               "final_loss": result.final_loss, "before": before, "after": after,
               "n_train": len(p.train), "n_eval": len(p.held)}
    if main:
        write_json_atomic(run_dir / "summary.json", summary)
    return summary


def dataclass_replace(cfg: RunConfig, **groups: dict) -> RunConfig:
    """A copy of ``cfg`` with fields replaced per group, e.g. ``loop={"steps": 10}``."""
    parts = {name: dataclasses.replace(getattr(cfg, name), **groups.get(name, {}))
             for name in ("model", "data", "loop")}
    return RunConfig(**parts)
