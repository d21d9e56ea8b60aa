"""Ablation: the frozen base's format under LoRA: fp32, bf16, NF4 (QLoRA) at a few ranks.

Each point trains LoRA on the bundled Rotten Tomatoes data with the bundled MiniLM (a small
budget, see --steps) and scores held-out accuracy. The bf16 and NF4 bases train under bf16
autocast; NF4 = 4-bit NormalFloat with double quantization (lora.quantize_model), the
classifier head left unquantized. Writes results/ablate_nf4.{csv,png}.

    python benchmarks/ablate_nf4.py                      # ~3 min on 2 cores
    python benchmarks/ablate_nf4.py --ranks 4 8 16 --steps 300
    python benchmarks/ablate_nf4.py --quick              # CI-sized
"""
from __future__ import annotations

import dataclasses

import torch

from _ablate import budget_args, budget_from, finish, run_trial, sweep
from _common import bench_args, setup, should_write

# ---------------------------------------------------------------------------------- knobs
# name -> (method, frozen base dtype, loop precision)
BASES = {"fp32": ("lora", torch.float32, "fp32"), "bf16": ("lora", torch.bfloat16, "bf16"),
         "nf4": ("qlora", torch.float32, "bf16")}
RANKS = (8,)
NAME = "ablate_nf4"


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    budget_args(p)
    args = p.parse_args()
    threads = setup(args)
    budget = budget_from(args)
    rows = []
    for r in sweep(args.ranks, args.quick, n_quick=1):
        for base in args.bases:
            method, dtype, precision = BASES[base]
            res = run_trial(dataclasses.replace(budget, precision=precision), base_dtype=dtype,
                            method=method, lora_r=r, lora_alpha=2.0 * r)
            rows.append({"base": base, "rank": r, **res, "steps": budget.steps,
                         "threads": threads})
            print(rows[-1], flush=True)
    finish(rows, NAME, args.out, write_docs=should_write(args),
           x="base", series="rank", categorical=True,
           title=f"Frozen base format under LoRA (MiniLM, {budget.steps} steps)")


if __name__ == "__main__":
    main()
