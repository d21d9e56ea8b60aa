"""Ablation: soft-prompt length (1...100 virtual tokens), Prompt Tuning and P-Tuning (MLP).

Each point trains on the bundled Rotten Tomatoes data with the bundled MiniLM (a small budget,
see --steps) and scores held-out accuracy. Writes results/ablate_prompt_length.{csv,png}.

    python benchmarks/ablate_prompt_length.py            # ~3 min on 2 cores
    python benchmarks/ablate_prompt_length.py --lengths 1 2 5 10 20 50 100 --steps 300
    python benchmarks/ablate_prompt_length.py --quick    # CI-sized
"""
from __future__ import annotations

from _ablate import budget_args, budget_from, finish, run_trial, sweep
from _common import bench_args, setup, should_write

# ---------------------------------------------------------------------------------- knobs
LENGTHS = (1, 5, 20, 100)
METHODS = ("prompt", "ptuning")
NAME = "ablate_prompt_length"


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    budget_args(p)
    args = p.parse_args()
    threads = setup(args)
    budget = budget_from(args)
    rows = []
    for method in args.methods:
        for n in sweep(args.lengths, args.quick):
            r = run_trial(budget, method=method, n_virtual=n)
            rows.append({"method": method, "n_virtual": n, **r, "steps": budget.steps,
                         "threads": threads})
            print(rows[-1], flush=True)
    finish(rows, NAME, args.out, write_docs=should_write(args),
           x="n_virtual", series="method",
           title=f"Prompt length (MiniLM, {budget.steps} steps)", log_x=True)


if __name__ == "__main__":
    main()
