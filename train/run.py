"""One training run from a ``RunConfig``: prepare, score before, train, score after, summarize.

Everything that can be wrong with the inputs (config values, data file, model folder, device,
sequence lengths, batch size) is checked in ``prepare`` before anything is written, so a bad run
leaves no half-made folder. ``run`` holds an exclusive lock on the run folder for the whole run
(``runlock``) and, on ``--resume``, refuses any change to what decides the numbers
(``fingerprint``).
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
from .atomic import write_json_atomic
from .checkpoint import latest_checkpoint, read_state
from .config import RunConfig
from .data import (DataError, answer_words, classification_to_instruction, encode_instruction,
                   encode_labels, encode_text, label_set, read_records, resolve_data, split_records)
from .evaluate import answer_accuracy, answer_token_ids, classify_accuracy, eval_loss
from .fingerprint import resume_differences, run_fingerprint
from .loop import resolve_device, train
from .models import load_backbone, load_tokenizer, resolve_model
from .packing import check_packing, disable_cache, loop_batches
from .runlock import hold_run_folder
from .templates import render, resolve_template

__all__ = ["Prepared", "prepare", "load_base", "build_model", "score", "run", "RUN_CONFIG", "LABELS_FILE"]

log = logging.getLogger(__name__)
RUN_CONFIG = "config.json"
LABELS_FILE = "labels.json"  # in the adapter folder: {"labels": [name of class 0, 1, ...]}


@dataclass
class Prepared:
    cfg: RunConfig
    folder: Path                    # the backbone's Hugging Face folder
    tokenizer: object
    task: str                       # "seq_cls" or "causal_lm"
    train: list[dict]               # encoded training examples
    held: list[dict]                # encoded held-out examples
    answer_ids: Optional[list[int]]  # causal LM with labelled data: one token per class
    labels: Optional[tuple] = None  # classification data: label names in id order
    template: Optional[str] = None  # causal LM: the resolved template (seed | chat | none)
    data_files: tuple = ()          # the data files / folders read (training, then held-out)

    @property
    def num_labels(self) -> int:
        """Classes of a classification head (2 when the data has no labels)."""
        return len(self.labels) if self.labels else 2


def _model_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def _template_identity(p: Prepared) -> str:
    """The resolved template rendered with placeholders (part of the resume fingerprint)."""
    if p.template is None:
        return ""
    turns = [{"role": "user", "content": "{user}"}, {"role": "assistant", "content": "{answer}"}]
    return f"{p.template}: {render(p.tokenizer, turns, p.template)[0]}"


def _is_causal(folder: Path) -> bool:
    return any(a.endswith("ForCausalLM") for a in _model_config(folder).get("architectures") or [])


def _check_lengths(cfg: RunConfig, folder: Path, examples: list[dict]) -> None:
    """Refuse examples (+ virtual tokens) longer than the model's position table, before training."""
    hf = _model_config(folder)
    limit = next((hf[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                  if isinstance(hf.get(k), int) and hf[k] > 0), None)
    virtual = cfg.model.n_virtual if cfg.model.method in ("prompt", "ptuning") else 0
    longest = max(len(e["input_ids"]) for e in examples)
    if limit is not None and longest + virtual > limit:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise ValueError(f"max_length={cfg.data.max_length}: the longest example has {longest} tokens{extra}, "
                         f"beyond the model's {limit} positions ({folder / 'config.json'}); use "
                         f"--max-length {limit - virtual} or less")


def _check_batch(cfg: RunConfig, n_train: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_process = -(-n_train // world)  # the sampler pads every rank to the same count
    if cfg.loop.batch_size > per_process:
        where = f" per process (WORLD_SIZE={world})" if world > 1 else ""
        raise ValueError(f"batch_size={cfg.loop.batch_size} is larger than the {per_process} training "
                         f"examples{where}; lower --batch-size or give more data")


def prepare(cfg: RunConfig) -> Prepared:
    """Resolve the model and data, read, split and encode; writes nothing.

    Raises:
        FileNotFoundError / DataError / ValueError naming the bad input.
    """
    resolve_device(cfg.loop.device)  # a CUDA device on a machine without one fails here
    d = cfg.data
    data_path = resolve_data(d.data)
    folder = resolve_model(cfg.model.model)
    records = read_records(data_path, d.text_column, d.label_column)
    files = [str(data_path)]
    if d.eval_data:  # a separate held-out file: the training file's non-train rows are left out
        eval_path = resolve_data(d.eval_data)
        held_recs = read_records(eval_path, d.text_column, d.label_column)
        files.append(str(eval_path))
        if ("text" in held_recs[0]) != ("text" in records[0]):
            raise DataError(f"--eval-data {eval_path} holds other records than --data {data_path}")
        train_recs = [r for r in records if r.get("split", "train") == "train"]
    else:
        train_recs, held_recs = split_records(records, d.eval_fraction, cfg.loop.seed)
    labelled = "text" in records[0]
    causal = _is_causal(folder)
    task = d.task
    if task == "auto":
        task = "instruct" if (causal or not labelled) else "classify"
    if task == "classify" and not labelled:
        raise ValueError(f"task=classify needs text,label records; {data_path} holds conversations")
    if cfg.model.method == "head" and task != "classify":
        raise ValueError("method 'head' trains a classification head; it needs task=classify and labelled data")
    if task != "classify" and cfg.model.prompt_pool != "backbone":
        raise ValueError(f"prompt_pool={cfg.model.prompt_pool!r} chooses a classifier's pooling; "
                         f"task={task!r} has no classifier and would ignore it")
    if d.packing and (task != "instruct" or cfg.model.method not in ("lora", "qlora")):
        raise ValueError(f"--packing needs an instruct task with lora or qlora (method={cfg.model.method}, "
                         f"task={task}): soft prompts and classifiers take one example per row")
    labels = None
    if labelled:
        labels = label_set(train_recs, d.num_labels)
        if d.label_words and len(d.label_words) != len(labels):
            raise DataError(f"label_words={d.label_words}; expected {len(labels)} words, one per label {list(labels)}")
        train_recs, held_recs = encode_labels(train_recs, labels), encode_labels(held_recs, labels)
    tokenizer = load_tokenizer(folder)
    tokenizer.name_or_path = cfg.model.model  # adapter configs name it as the user did, not the cache path
    if d.max_train:
        train_recs = train_recs[:d.max_train]
    if d.max_eval:
        held_recs = held_recs[:d.max_eval]
    answer_ids, template, n = None, None, d.max_length
    if task == "classify":
        enc_train = [encode_text(tokenizer, r, n) for r in train_recs]
        enc_held = [encode_text(tokenizer, r, n) for r in held_recs]
    else:
        template = resolve_template(d.template, tokenizer)
        if labelled:
            words = answer_words(d, labels)
            answer_ids = answer_token_ids(tokenizer, words, template, d.instruction)
            if len(set(answer_ids)) != len(answer_ids):
                raise DataError(f"answer words {list(words)} share a first token {answer_ids}; pick distinct words")
            train_recs = classification_to_instruction(train_recs, d.instruction, words)
            held_recs = classification_to_instruction(held_recs, d.instruction, words)

        def enc(r: dict) -> dict:
            e = encode_instruction(tokenizer, r, n, template)
            return dict(e, label=r["label"]) if "label" in r else e
        enc_train, enc_held = [enc(r) for r in train_recs], [enc(r) for r in held_recs]
        kept = [e for e in enc_train if any(x != -100 for x in e["labels"])]
        if len(kept) < len(enc_train):
            log.warning("%d training examples lost their whole answer to max_length=%d and are skipped",
                        len(enc_train) - len(kept), n)
        enc_train = kept
        if not enc_train:
            raise ValueError(f"no training example keeps an answer within max_length={n}")
    _check_lengths(cfg, folder, enc_train + enc_held)
    _check_batch(cfg, len(enc_train))
    return Prepared(cfg=cfg, folder=folder, tokenizer=tokenizer,
                    task="seq_cls" if task == "classify" else "causal_lm",
                    train=enc_train, held=enc_held, answer_ids=answer_ids, labels=labels,
                    template=template, data_files=tuple(files))


BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_base(cfg: RunConfig, folder: Path, task: str, device: Optional[torch.device] = None,
              num_labels: Optional[int] = None) -> torch.nn.Module:
    """The run's frozen backbone, streamed onto ``device`` in ``--base-dtype``; for ``qlora``
    its linear layers (all but the heads / ``--nf4-skip``) become NF4 as they are read.
    ``num_labels``: classes of a classifier head (default: ``cfg.data.num_labels``)."""
    dtype = BASE_DTYPES[cfg.model.base_dtype]
    quantize = adapters.nf4_config(cfg.model, task, dtype) if cfg.model.method == "qlora" else None
    backbone = load_backbone(folder, task, num_labels=num_labels or cfg.data.num_labels, dtype=dtype,
                             quantize=quantize, device=device or "cpu")
    name_model(backbone, cfg.model.model)
    return backbone


def build_model(p: Prepared, device: Optional[torch.device] = None) -> torch.nn.Module:
    """The backbone (seeded, so a new classifier head is the same each run) with its adapter.

    The backbone is loaded straight onto ``device``, so QLoRA quantizes there.
    """
    torch.manual_seed(p.cfg.loop.seed)
    backbone = load_base(p.cfg, p.folder, p.task, device, num_labels=p.num_labels)
    return adapters.build_adapted(backbone, p.cfg.model, p.task, p.tokenizer)


def name_model(backbone: torch.nn.Module, name: str) -> None:
    """Record the model as the user named it (bundled name, hub id or the path given), not the
    folder it resolved to, so adapter configs carry no machine-local cache path."""
    backbone.name_or_path = name
    if getattr(backbone, "config", None) is not None:
        backbone.config._name_or_path = name


def padding_side(model: torch.nn.Module, p: Prepared) -> str:
    """The collator's side: left for soft-prompt classifiers on decoders (their head reads the
    last position, and with a prompt in inputs_embeds it cannot look for pad ids), else the config's."""
    backbone = getattr(model, "backbone", None)
    if p.task == "seq_cls" and hasattr(model, "prompt_encoder") and backbone is not None \
            and not hasattr(getattr(backbone, "base_model", None), "pooler"):
        return "left"
    return p.cfg.data.padding_side


def score(model: torch.nn.Module, p: Prepared, device: torch.device) -> dict:
    """Held-out metrics: accuracy (when there are labels) and eval loss where defined."""
    pad = p.tokenizer.pad_token_id
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.cfg.loop.precision)
    # score under the training precision: what was trained is what is measured
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        if p.task == "seq_cls":
            return classify_accuracy(model, p.held, pad, device, padding_side=padding_side(model, p))
        if p.answer_ids is not None:  # labelled: accuracy of the answer word (one position per prompt)
            return answer_accuracy(model, p.held, p.answer_ids, pad, device)
        return eval_loss(model, p.held, pad, device)


def _resume_state(run_dir: Path, cfg: RunConfig, fingerprint: dict) -> dict:
    """The latest checkpoint's state; refuses a resume whose inputs would change the numbers."""
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    state = read_state(folder)
    diff = resume_differences(state.get("run", {}), state.get("fingerprint", {}), cfg.to_dict(), fingerprint)
    if diff:
        raise ValueError(f"--resume: {folder} was trained with other inputs; refusing to continue with "
                         f"{'; '.join(diff)}. Resume with the original values or start a new --out")
    return state


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, prepared: Optional[Prepared] = None) -> dict:
    """Train one adapter and write the run folder; returns the summary.

    The folder gets ``config.json``, ``metrics.jsonl``, ``loss.png``, ``checkpoints/``,
    ``adapter/`` (the method's adapter) and ``summary.json``. The folder is locked for the whole
    run; it must be empty (or absent) unless ``resume``.

    Raises:
        RunFolderBusy: another run holds the folder. FileExistsError: a non-empty folder without
        ``resume``. ValueError: a bad ``run_dir``, or a resume whose inputs changed (all named).
    """
    p = prepared or prepare(cfg)
    run_dir = Path(run_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
    device = resolve_device(cfg.loop.device)
    fingerprint = run_fingerprint(cfg, p.folder, p.tokenizer, _template_identity(p))
    with hold_run_folder(run_dir) if main else contextlib.nullcontext(False):
        if main and not resume and any(run_dir.iterdir()):
            raise FileExistsError(f"run folder {run_dir} is not empty; pick another --out or pass --resume")
        state = _resume_state(run_dir, cfg, fingerprint) if resume else {}
        model = build_model(p, device)
        if cfg.data.packing:
            disable_cache(model)
            check_packing(model, device, vocab=min(len(p.tokenizer), model.get_input_embeddings().num_embeddings))
        before = state.get("before", {}) if resume else score(model, p, device)
        if main:
            write_json_atomic(run_dir / RUN_CONFIG, {**cfg.to_dict(), "effective_lr": cfg.lr,
                                                     "fingerprint": fingerprint})
        method = cfg.model.method
        t0 = time.perf_counter()
        examples, collate, order = loop_batches(p.train, cfg.data, cfg.loop, p.tokenizer.pad_token_id,
                                                padding_side(model, p))
        result = train(model, examples, collate, cfg.loop,
                       run_dir, cfg.lr, evaluate=lambda m: score(m, p, device),
                       write_adapter=lambda m, f: adapters.save_adapted(m, method, f), resume=resume,
                       extra_state={"run": cfg.to_dict(), "fingerprint": fingerprint, "before": before},
                       batch_order=order)
        seconds = time.perf_counter() - t0
        after = score(model, p, device)
        adapter_dir = adapters.save_adapted(model, method, run_dir / "adapter") if main else None
        if main and p.labels:  # the label names travel with the adapter (predict prints them)
            write_json_atomic(Path(adapter_dir) / LABELS_FILE, {"labels": list(p.labels)})
        summary = {"method": method, "model": cfg.model.model, "data": cfg.data.data, "task": p.task,
                   "trainable_params": adapters.count_trainable(model),
                   "adapter_bytes": adapters.adapter_bytes(adapter_dir), "steps": result.steps,
                   "s_per_step": result.seconds_per_step, "train_seconds": seconds,
                   "final_loss": result.final_loss, "before": before, "after": after,
                   "n_train": len(p.train), "n_eval": len(p.held), "template": p.template,
                   "labels": list(p.labels) if p.labels else None,
                   "packed_rows": len(examples) if cfg.data.packing else None}
        if main:
            write_json_atomic(run_dir / "summary.json", summary)
    return summary


def dataclass_replace(cfg: RunConfig, **groups: dict) -> RunConfig:
    """A copy of ``cfg`` with fields replaced per group, e.g. ``loop={"steps": 10}``."""
    parts = {name: dataclasses.replace(getattr(cfg, name), **groups.get(name, {}))
             for name in ("model", "data", "loop")}
    return RunConfig(**parts)
