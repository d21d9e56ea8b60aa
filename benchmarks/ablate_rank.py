"""Ablation: LoRA rank (1...64) and target set (query+value vs every linear of the encoder).

Each point trains on the bundled Rotten Tomatoes data with the bundled MiniLM (a small budget,
see --steps) and scores held-out accuracy. alpha = 2 * rank (the usual rule, constant update
size), so the sweep isolates capacity. Writes results/ablate_rank.{csv,png}.

    python benchmarks/ablate_rank.py                     # ~3 min on 2 cores
    python benchmarks/ablate_rank.py --ranks 1 2 4 8 16 32 64 --steps 300
    python benchmarks/ablate_rank.py --quick             # CI-sized
"""
from __future__ import annotations

from _ablate import budget_args, budget_from, finish, run_trial, sweep
from _common import bench_args, setup, should_write

# ---------------------------------------------------------------------------------- knobs
RANKS = (1, 4, 16, 64)
# name -> BERT module names (suffix match); "dense" is the attention output, the FFN in/out
# projections and the pooler
TARGET_SETS = {"qv": ("query", "value"), "all-linear": ("query", "key", "value", "dense")}
NAME = "ablate_rank"


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    p.add_argument("--targets", nargs="+", default=list(TARGET_SETS), choices=list(TARGET_SETS))
    budget_args(p)
    args = p.parse_args()
    threads = setup(args)
    budget = budget_from(args)
    rows = []
    for targets in args.targets:
        for r in sweep(args.ranks, args.quick):
            res = run_trial(budget, method="lora", lora_r=r, lora_alpha=2.0 * r,
                            target_modules=TARGET_SETS[targets])
            rows.append({"targets": targets, "rank": r, **res, "steps": budget.steps,
                         "threads": threads})
            print(rows[-1], flush=True)
    finish(rows, NAME, args.out, write_docs=should_write(args),
           x="rank", series="targets", log_x=True,
           title=f"LoRA rank and targets (MiniLM, {budget.steps} steps)")


if __name__ == "__main__":
    main()
