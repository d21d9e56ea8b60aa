"""The training loop: one function, read top to bottom.

``train`` takes any ``nn.Module`` whose ``forward(**batch)`` returns an object with ``.loss``
(an adapted model from ``softprompt`` or ``lora``, or anything else with frozen and trainable
parameters) and optimizes its trainable parameters only. Under ``torchrun`` (``WORLD_SIZE`` > 1)
the same loop runs DDP or FSDP2 (``cfg.distributed``, see ``train/distributed.py``): every rank
reads its share of each global batch, gradients of the trainable parameters are averaged, rank 0
logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from . import distributed
from .atomic import atomic_write_text
from .checkpoint import latest_checkpoint, load_checkpoint, named_trainable, remove_orphans, save_checkpoint
from .config import LoopConfig
from .loss import batch_loss
from .memory import release_freed_memory, releases_each_step
from .metrics import open_board
from .plot import plot_loss, read_metrics
from .schedule import lr_factor

__all__ = ["train", "TrainResult", "NonFiniteLossError", "resolve_device", "label_count"]

log = logging.getLogger(__name__)

# loop fields that change the numbers: a resumed run must use the same values
_RESUME_FIELDS = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps",
                  "schedule", "precision", "max_grad_norm", "seed")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept untouched."""


@dataclass
class TrainResult:
    steps: int                      # optimizer steps completed
    final_loss: float               # mean loss of the last logged window
    seconds_per_step: float         # median wall time of one optimizer step
    run_dir: Path                   # where metrics, checkpoints and the plot were written
    checkpoint: Optional[Path]      # the final checkpoint folder (rank 0), else None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this process's CUDA device when available (LOCAL_RANK under torchrun), else CPU.

    Raises:
        ValueError: a CUDA device is asked for and this machine has none (or not that index).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def label_count(batch: dict) -> int:
    """How many targets the model's mean loss averages over: (B,) labels -> B; (B, T) causal
    labels -> positions after the shift (``labels[:, 1:]``) that are not -100."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != -100).sum())


def _grad_checkpointing(model: torch.nn.Module) -> None:
    # Non-reentrant checkpointing needs no input that requires grad, so it works with a
    # frozen embedding (and with DDP); enable it on the first HF model found inside.
    for module in model.modules():
        if getattr(module, "supports_gradient_checkpointing", False):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
    raise ValueError("grad_checkpointing=True but no module supports gradient checkpointing")


def _epoch_batches(n: int, epoch: int, cfg: LoopConfig, rank: int, world: int) -> list[list[int]]:
    # The permutation depends only on (seed, epoch), not on the world size: rank r reads
    # positions r, r+world, ... so the first `world` micro-batches together hold the same
    # examples as one single-process batch `world` times larger.
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    sampler.set_epoch(epoch)
    order = list(iter(sampler))
    full = len(order) // cfg.batch_size
    if full == 0:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(order)} examples per process")
    return [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(full)]


def train(model: torch.nn.Module, examples: list, collate: Callable[[list], dict], cfg: LoopConfig,
          run_dir: Path, lr: float, *, evaluate: Optional[Callable[[torch.nn.Module], dict]] = None,
          write_adapter: Optional[Callable[[torch.nn.Module, Path], None]] = None,
          resume: bool = False, extra_state: Optional[dict] = None,
          batch_order: Optional[Callable[[int, int, int], list[list[int]]]] = None) -> TrainResult:
    """Optimize ``model``'s trainable parameters on ``examples``.

    Args:
        model: returns ``.loss`` from ``forward(**batch)``; frozen parameters stay untouched.
        examples: encoded examples; ``collate(list_of_examples)`` makes a batch of tensors.
        collate: the batching function (e.g. ``PadCollator``).
        cfg: loop knobs (steps, batch, accumulation, precision, schedule, checkpoints...).
        run_dir: output folder: ``metrics.jsonl``, ``loss.png``, ``checkpoints/``.
        lr: peak learning rate.
        evaluate: called with the model in eval mode every ``cfg.eval_every`` steps (on rank 0;
            on every rank under FSDP2, whose forward is collective);
            returns JSON-ready metrics.
        write_adapter: writes the method's adapter folder into each checkpoint.
        resume: continue from ``run_dir``'s latest checkpoint.
        extra_state: JSON-ready fields stored in each checkpoint (e.g. the run config).
        batch_order: ``(epoch, rank, world) -> index lists`` of this process's micro-batches
            (e.g. ``train.packing.grouped_batches``); default: a seeded shuffle.
    Returns:
        A ``TrainResult``.
    Raises:
        NonFiniteLossError: the loss became NaN/inf (the last checkpoint is kept).
    """
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr={lr}; expected a positive finite learning rate")
    run_dir = Path(run_dir)

    # -- processes and device ---------------------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    main = rank == 0
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_orphans(run_dir)  # temp folders/files of writes a kill interrupted

    # -- seeds, model, optimizer over trainable parameters only -----------------------------
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    model.to(device)
    if cfg.grad_checkpointing:
        _grad_checkpointing(model)
    params = [p for _, p in named_trainable(model)]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    release_each_step = releases_each_step(cfg.release_memory, model, device)  # CPU heap (train/memory.py)
    net = distributed.wrap(model, cfg.distributed, world, device)  # DDP or FSDP2 (train/distributed.py)
    if cfg.compile:  # the forward only: checkpoints and adapters still see the plain model
        net = torch.compile(net)

    # -- mixed precision: autocast for bf16/fp16, a GradScaler only for fp16 ----------------
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    # -- resume --------------------------------------------------------------------------------
    start, window, norms, window_tokens, window_time = 0, [], [], 0.0, 0.0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        folder = latest_checkpoint(run_dir)
        if folder is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}")
        state = load_checkpoint(folder, model, optimizer)
        saved = state.get("loop", {})
        changed = [k for k in _RESUME_FIELDS if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            raise ValueError(f"--resume: {changed} differ from the checkpoint's loop config {saved}")
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = state["step"]
        # the log window the checkpoint cut: the next metrics line averages the whole window
        cut = state.get("log_window") or {}
        window, norms = list(cut.get("loss", [])), list(cut.get("grad_norm", []))
        window_tokens, window_time = float(cut.get("tokens", 0.0)), float(cut.get("seconds", 0.0))
        if main and metrics_path.is_file():  # drop log lines written after the checkpoint
            keep = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= start]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in keep))
    elif main and metrics_path.exists():
        metrics_path.unlink()

    board = open_board(run_dir, cfg.log) if main else None

    def log_record(record: dict) -> None:
        if main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if board is not None:
                board.write(record)

    extra = {"loop": dataclasses.asdict(cfg), "lr": lr, "world_size": world, **(extra_state or {})}

    def checkpoint(step: int) -> Optional[Path]:
        path = None
        if main:
            path = save_checkpoint(run_dir, step, model, optimizer, scaler.state_dict() if scaler else None,
                                   {**extra, "log_window": {"loss": list(window), "grad_norm": list(norms),
                                                            "tokens": window_tokens, "seconds": window_time}},
                                   write_adapter)
        if world > 1:
            dist.barrier()
        return path

    # -- the loop --------------------------------------------------------------------------------
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and main), unit="step")
    except ImportError:  # tqdm is a dependency; keep the loop usable without it
        bar = None
    def epoch_batches(epoch: int) -> list[list[int]]:
        if batch_order is not None:
            return batch_order(epoch, rank, world)
        return _epoch_batches(len(examples), epoch, cfg, rank, world)

    epochs: dict[int, list[list[int]]] = {}
    step_times, last_ckpt = [], None
    net.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        micro = []
        for a in range(cfg.grad_accum):
            m = step * cfg.grad_accum + a  # global micro-batch index: the data order is a function of it
            if not epochs:
                epochs[0] = epoch_batches(0)
            per_epoch = len(epochs[0])
            epoch, j = divmod(m, per_epoch)
            if epoch not in epochs:
                epochs = {0: epochs[0], epoch: epoch_batches(epoch)}
            micro.append(collate([examples[i] for i in epochs[epoch][j]]))
        # Weight each micro-batch by its share of the step's targets, so that B x 1 and
        # (B/k) x k accumulation, and N ranks, all give the mean over the global batch.
        counts = torch.tensor([label_count(b) for b in micro], dtype=torch.float64)
        total = counts.sum()
        # packed batches carry no attention_mask: every position is a token
        tokens = torch.tensor(float(sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                                        else b["input_ids"].numel() for b in micro)))
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(tokens)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for a, batch in enumerate(micro):
            batch = {k: v.to(device) for k, v in batch.items()}
            with distributed.accumulate(net, last=a == cfg.grad_accum - 1):
                with autocast():
                    # labelled positions only for causal LMs (train/loss.py); 0 when a batch has
                    # no target left, so DDP ranks still run the same collective calls
                    loss = batch_loss(net, batch, cfg.loss, cfg.loss_chunk).float()
                bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0)
                if world > 1:  # every rank must stop together, before any backward all-reduce
                    dist.all_reduce(bad)
                if bad.item():
                    last = latest_checkpoint(run_dir)
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {step + 1} (micro-batch {a}); stopping. "
                        f"Lower the learning rate or use bf16/fp32. Last good checkpoint: "
                        f"{last if last else 'none written yet'}")
                weighted = loss * (float(counts[a]) * world / float(total))
                (scaler.scale(weighted) if scaler else weighted).backward()
                loss_sum += loss.detach().double().cpu() * counts[a]
        distributed.average_gradients(net, params, world)  # FSDP2 only: DDP averaged in backward
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norms.append(float(norm))
        lr_now = lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        if scaler is not None:
            scaler.step(optimizer)  # skipped when the unscaled grads hold inf/NaN
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if release_each_step:
            release_freed_memory()  # the step's activations, freed, go back to the OS (train/memory.py)
        if world > 1:
            dist.all_reduce(loss_sum)
        step_loss = float(loss_sum / total) if total > 0 else float("nan")
        dt = time.perf_counter() - t0
        step_times.append(dt)
        window.append(step_loss)
        window_tokens += float(tokens)
        window_time += dt
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{float(tokens) / dt:.0f}")
        if done % cfg.log_every == 0 or done == cfg.steps:
            log_record({"kind": "train", "step": done, "loss": sum(window) / len(window), "lr": lr_now,
                        "grad_norm": sum(norms) / len(norms), "tokens_per_s": window_tokens / window_time,
                        "s_per_step": window_time / len(window)})
            window, norms, window_tokens, window_time = [], [], 0.0, 0.0
        if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            if main or distributed.forward_needs_all_ranks(net):  # FSDP2: every rank runs forward
                net.eval()
                log_record({"kind": "eval", "step": done, **evaluate(model)})
                net.train()
            if world > 1:
                dist.barrier()
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            last_ckpt = checkpoint(done)
    if bar is not None:
        bar.close()
    if board is not None:
        board.close()
    net.eval()
    if main:
        plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name)
    median = sorted(step_times)[len(step_times) // 2] if step_times else float("nan")
    final = [r for r in read_metrics(metrics_path) if r.get("kind") == "train"] if main else []
    return TrainResult(steps=cfg.steps, final_loss=final[-1]["loss"] if final else float("nan"),
                       seconds_per_step=median, run_dir=run_dir, checkpoint=last_ckpt)
