"""Ablation: P-Tuning encoder type (none = plain Prompt Tuning, mlp, lstm) at fixed lengths.

Each point trains on the bundled Rotten Tomatoes data with the bundled MiniLM (a small budget,
see --steps) and scores held-out accuracy. Writes results/ablate_encoder.{csv,png}.

    python benchmarks/ablate_encoder.py                  # ~3 min on 2 cores
    python benchmarks/ablate_encoder.py --lengths 5 20 50 --steps 300
    python benchmarks/ablate_encoder.py --quick          # CI-sized
"""
from __future__ import annotations

from _ablate import budget_args, budget_from, finish, run_trial, sweep
from _common import bench_args, setup, should_write

# ---------------------------------------------------------------------------------- knobs
ENCODERS = ("none", "mlp", "lstm")   # none = Prompt Tuning: the table itself is trained
LENGTHS = (20,)
NAME = "ablate_encoder"


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    budget_args(p)
    args = p.parse_args()
    threads = setup(args)
    budget = budget_from(args)
    rows = []
    for n in sweep(args.lengths, args.quick, n_quick=1):
        for enc in args.encoders:
            fields = ({"method": "prompt"} if enc == "none" else
                      {"method": "ptuning", "encoder": enc})
            r = run_trial(budget, n_virtual=n, **fields)
            rows.append({"encoder": enc, "n_virtual": n, **r, "steps": budget.steps,
                         "threads": threads})
            print(rows[-1], flush=True)
    finish(rows, NAME, args.out, write_docs=should_write(args),
           x="encoder", series="n_virtual", categorical=True,
           title=f"Prompt encoder (MiniLM, {budget.steps} steps)")


if __name__ == "__main__":
    main()
