"""A training run in its own process, for the resume-after-kill and torchrun DDP tests.

usage: python -m tests.train._worker RUN_DIR MODE [--resume]
MODE: "resume" (12 steps, checkpoint every 3, dropout on), "slow" (the same, 0.2 s per
forward, to be killed), "ddp" / "single" (dropout off; ddp runs under torchrun with half the
per-process batch of single).
"""
from __future__ import annotations

import sys
import time

import torch

from tests.train.helpers import collator, instruct_examples, toy_causal
from train.config import LoopConfig
from train.loop import train


def main() -> None:
    run_dir, mode = sys.argv[1], sys.argv[2]
    resume = "--resume" in sys.argv
    torch.set_num_threads(1)
    if mode in ("resume", "slow"):
        model = toy_causal(dropout=0.1)
        if mode == "slow":  # same parameter names as "resume": only the pace differs
            model.register_forward_pre_hook(lambda module, args: time.sleep(0.2))
        cfg = LoopConfig(steps=12, batch_size=4, grad_accum=2, save_every=3, log_every=1,
                         warmup_steps=2, progress=False)
    else:
        model = toy_causal(dropout=0.0)
        cfg = LoopConfig(steps=4, batch_size=4 if mode == "ddp" else 8, grad_accum=2, log_every=1,
                         progress=False)
    train(model, instruct_examples(32), collator(), cfg, run_dir, lr=1e-2, resume=resume)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
