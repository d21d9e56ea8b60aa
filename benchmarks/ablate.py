"""Ablations as multi-seed sweeps: accuracy mean ± std and 95% CI per setting, plots with error bars.

Each spec in benchmarks/sweeps/ is a `python -m train sweep` spec (docs/sweep.md): the bundled
MiniLM on the bundled Rotten Tomatoes split, 3 seeds per setting, at a budget where the methods
leave chance. The runs are ordinary run folders under --out (default runs/ablations/<spec>), so a
killed ablation continues where it stopped. Results: benchmarks/results/ablate_<spec>.{csv,png}
and the docs/benchmarks.md section `ablate_<spec>`.

    python benchmarks/ablate.py                          # every spec (~1 h on 2 cores)
    python benchmarks/ablate.py rank nf4 --workers 2     # some specs, two runs at once
    python benchmarks/ablate.py --quick                  # 2 steps, 2 seeds, 48 examples: a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import BENCH_DOC, ROOT, header, write_section

SPECS = ROOT / "benchmarks" / "sweeps"
RESULTS = ROOT / "benchmarks" / "results"
TITLES = {"prompt_length": "Prompt Tuning: number of virtual tokens",
          "encoder": "P-Tuning: prompt encoder",
          "rank": "LoRA: rank x targets (alpha = 2r)",
          "nf4": "LoRA: frozen base fp32 / bf16 / NF4 (QLoRA)",
          "lora_lr": "LoRA: learning rate",
          "demo_softprompt": "Soft prompts at the demo's budget (bf16, 300 steps): learning rate",
          "demo_ptuning": "P-Tuning (MLP) at a longer demo budget (bf16, 500 steps): learning rate",
          "demo_ptuning_encoder": "P-Tuning at the demo's budget (500 steps, lr 1e-2): LSTM encoder, or fp32",
          "demo_ptuning_lstm": "P-Tuning (LSTM) as the demo runs it (bf16, two threads): higher lr, or more steps"}


def _budget(spec) -> str:
    loop, data = spec.base.get("loop", {}), spec.base.get("data", {})
    return (f"{loop.get('steps')} steps of batch {loop.get('batch_size')}, lr {loop.get('lr', 'per cell')}, "
            f"{loop.get('precision', 'fp32')}, max_length {data.get('max_length')}, "
            f"{data.get('max_eval') or 'all'} held-out snippets, seeds {list(spec.seeds)}")


def _quick(spec):
    from train.sweep import SweepSpec
    base = copy.deepcopy(spec.base)
    base["loop"].update(steps=2, batch_size=8, log_every=1)
    base["data"].update(max_train=48, max_eval=32)
    return SweepSpec(base=base, grid=spec.grid, cells=spec.cells, seeds=spec.seeds[:2], metric=spec.metric)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="*", default=sorted(f.stem for f in SPECS.glob("*.json")),
                   help="spec names in benchmarks/sweeps/ (default: all)")
    p.add_argument("--workers", type=int, default=1, help="runs at once (separate processes)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ablations", help="sweep folders")
    p.add_argument("--quick", action="store_true", help="a smoke run; leaves docs and results alone")
    args = p.parse_args()
    import transformers
    from train.sweep import format_summary, load_spec, run_sweep
    transformers.logging.set_verbosity_error()

    for name in args.specs:
        spec = load_spec(SPECS / f"{name}.json")
        if args.quick:
            spec = _quick(spec)
        out = args.out / (name + ("-quick" if args.quick else ""))
        summary = run_sweep(spec, out, workers=args.workers, progress=print)
        table = format_summary(summary, spec.metric)
        print(table)
        if args.quick:
            continue
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.csv", RESULTS / f"ablate_{name}.csv")
        shutil.copyfile(out / "sweep.png", RESULTS / f"ablate_{name}.png")
        before = [json.loads((Path(r) / "summary.json").read_text())["before"].get(spec.metric)
                  for r in _runs(out)]
        before = [b for b in before if b is not None]
        chance = f"; before training: {min(before):.3f}-{max(before):.3f}" if before else ""
        threads = max(1, (os.cpu_count() or 1) // args.workers)  # per run, as train.sweep sets them
        png = os.path.relpath(RESULTS / f"ablate_{name}.png", BENCH_DOC.parent)
        body = (f"### {TITLES.get(name, name)}\n\n{header(threads)}\n\n"
                f"Budget: {_budget(spec)}{chance}. Spec: `benchmarks/sweeps/{name}.json`; "
                f"regenerate with `python benchmarks/ablate.py {name}`. s/step is the median of the "
                f"cell's runs ({args.workers} run(s) at once).\n\n{table}\n![{name}]({png})\n")
        write_section(f"ablate_{name}", body)


def _runs(out: Path) -> list[str]:
    import csv
    with open(out / "results.csv", newline="") as f:
        return [row["run_dir"] for row in csv.DictReader(f)]


if __name__ == "__main__":
    main()
