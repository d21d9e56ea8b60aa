"""LoRA and QLoRA training in their own process, for the FSDP2 tests (tests/train/test_fsdp2.py).

usage: python -m tests.train._fsdp_worker RUN_DIR MODE [--resume]
MODE: "single" (one process, LoRA then QLoRA, 8 examples per micro-batch), "fsdp2" (the same
under torchrun with 2 processes of 4), "slow" (FSDP2 QLoRA only, 0.2 s per forward, to be killed).
Each method writes to RUN_DIR/<method>.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from lora import LoRAConfig, add_lora, quantize_model
from tests.models import tiny_causal_lm
from tests.train.helpers import collator, instruct_examples
from train.config import LoopConfig
from train.loop import train

STEPS, SAVE_EVERY = 6, 2


def build(method: str) -> torch.nn.Module:
    model = tiny_causal_lm("llama", seed=0)
    if method == "qlora":
        quantize_model(model, blocksize=64, double_quant=True)
    torch.manual_seed(1)
    return add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))


def _write_layout(model: torch.nn.Module, path: Path) -> None:
    """Rank 0 records how each frozen parameter is held: (dtype, global numel, local numel)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    layout = {n: [str(p.dtype), p.numel(), getattr(p, "_local_tensor", p).numel()]
              for n, p in model.named_parameters() if not p.requires_grad}
    path.write_text(json.dumps(layout))


def main() -> None:
    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    resume = "--resume" in sys.argv
    torch.set_num_threads(1)
    methods = ("qlora",) if mode == "slow" or resume else ("lora", "qlora")
    for method in methods:
        model = build(method)
        if mode == "slow":
            model.register_forward_pre_hook(lambda module, args: time.sleep(0.2))
        cfg = LoopConfig(steps=STEPS, batch_size=8 if mode == "single" else 4, grad_accum=2,
                         save_every=SAVE_EVERY, log_every=1, warmup_steps=1, progress=False,
                         distributed="ddp" if mode == "single" else "fsdp2")
        train(model, instruct_examples(32), collator(), cfg, run_dir / method, lr=1e-2,
              resume=resume)
        _write_layout(model, run_dir / method / "layout.json")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
