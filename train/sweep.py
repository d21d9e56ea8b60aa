"""``python -m train sweep SPEC``: a grid of runs over method x knobs x seeds, with statistics.

A spec is a JSON object::

    {"base":  {"model": {...}, "data": {...}, "loop": {...}},   # shared by every run
     "grid":  {"model.lora_r": [4, 8, 16], "loop.lr": [1e-3, 3e-3]},  # cartesian product
     "cells": [{"model.method": "lora"}, {"model.method": "qlora"}],  # and/or explicit cells
     "seeds": [0, 1, 2],                                    # loop.seed of each repeat
     "metric": "accuracy"}                                  # key of summary["after"] to aggregate

Every (cell, seed) is a normal run folder ``OUT/runs/<cell>/seed-<k>/`` written by
``train.run.run``. A run whose folder holds ``summary.json`` is finished and skipped, one with a
checkpoint is resumed, anything else is started afresh, so a killed sweep continues where it
stopped. With ``workers > 1`` runs go to that many ``python -m train train`` processes at once,
each given an equal share of the CPU threads.

Outputs: ``results.csv`` (one row per run), ``summary.csv`` and ``summary.md`` (per cell: n,
mean, standard deviation, 95% confidence interval of the mean from Student's t) and
``sweep.png`` (means with the interval as error bars; needs matplotlib).
"""
from __future__ import annotations

import concurrent.futures
import copy
import csv
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .atomic import atomic_write
from .config import RunConfig

__all__ = ["SweepSpec", "Cell", "load_spec", "expand", "run_sweep", "mean_std_ci", "t_quantile_975"]

log = logging.getLogger(__name__)

# Two-sided 95% quantiles of Student's t distribution, t_{0.975, df}, df = 1..30.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: tabulated for df <= 30, beyond that the first Cornish-Fisher term."""
    if df < 1:
        raise ValueError(f"df={df}; expected >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df)


def mean_std_ci(values: Sequence[float]) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation (n - 1) and the 95% interval of the mean.

    Returns:
        ``(mean, std, low, high)``; with one value std is 0 and the interval is that value.
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, mean, mean
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


@dataclass(frozen=True)
class Cell:
    name: str                       # folder-safe name, e.g. "lora_r=8,lr=0.001"
    overrides: dict                 # "group.field" -> value applied on top of the base
    config: dict                    # the full {"model", "data", "loop"} dict, seed not yet set


@dataclass(frozen=True)
class SweepSpec:
    base: dict                      # {"model": {...}, "data": {...}, "loop": {...}}
    grid: dict                      # "group.field" -> list of values (cartesian product)
    cells: tuple                    # explicit override dicts, each one cell
    seeds: tuple                    # loop.seed of the repeats
    metric: str                     # key of a run's summary["after"] to aggregate

    def __post_init__(self) -> None:
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds={list(self.seeds)!r}; expected a non-empty list of integers")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={list(self.seeds)!r}; expected distinct seeds")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid[{key!r}]={values!r}; expected a non-empty list of values")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric={self.metric!r}; expected a key of the runs' summary 'after' metrics")


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and check a spec file; errors name the file and the bad entry."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep spec {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"sweep spec {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"sweep spec {path}: expected a JSON object")
    unknown = set(raw) - {"base", "grid", "cells", "seeds", "metric"}
    if unknown:
        raise ValueError(f"sweep spec {path}: unknown key(s) {sorted(unknown)}; "
                         f"expected base, grid, cells, seeds, metric")
    cells = raw.get("cells", [])
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise ValueError(f"sweep spec {path}: 'cells' must be a list of objects")
    for name in ("base", "grid"):
        if not isinstance(raw.get(name, {}), dict):
            raise ValueError(f"sweep spec {path}: {name!r} must be an object")
    try:
        return SweepSpec(base=raw.get("base", {}), grid=raw.get("grid", {}), cells=tuple(cells),
                         seeds=tuple(raw.get("seeds", [0])), metric=raw.get("metric", "accuracy"))
    except ValueError as e:
        raise ValueError(f"sweep spec {path}: {e}") from None


def _apply(config: dict, key: str, value) -> None:
    group, _, field = key.partition(".")
    if group not in ("model", "data", "loop") or not field:
        raise ValueError(f"sweep key {key!r}; expected 'model.<field>', 'data.<field>' or 'loop.<field>'")
    if key == "loop.seed":
        raise ValueError("sweep key 'loop.seed' is set by 'seeds'; list the seeds there")
    config[group][field] = value


def _cell_name(overrides: dict) -> str:
    if not overrides:
        return "base"
    parts = [f"{k.partition('.')[2]}={'+'.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in overrides.items()]
    return "".join(c if c.isalnum() or c in "=,.+-_" else "_" for c in ",".join(parts))


def expand(spec: SweepSpec) -> list[Cell]:
    """The spec's cells: every explicit cell crossed with the grid's product; each is checked
    by building its ``RunConfig`` (so a bad field fails before any run starts)."""
    base = {g: dict(spec.base.get(g, {})) for g in ("model", "data", "loop")}
    unknown = set(spec.base) - {"model", "data", "loop"}
    if unknown:
        raise ValueError(f"sweep base: unknown section(s) {sorted(unknown)}; expected model, data, loop")
    keys = list(spec.grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(spec.grid[k] for k in keys))]
    out, seen = [], set()
    for explicit in (spec.cells or ({},)):
        for combo in combos:
            overrides = {**explicit, **combo}
            config = copy.deepcopy(base)
            for key, value in overrides.items():
                _apply(config, key, value)
            RunConfig.from_dict(config)  # names an unknown field or a bad value
            name = _cell_name(overrides)
            if name in seen:
                raise ValueError(f"sweep cell {name!r} appears twice; make the cells distinct")
            seen.add(name)
            out.append(Cell(name, overrides, config))
    return out


def _run_one(config: dict, folder: Path, workers: int) -> None:
    """One run: skipped when finished, resumed from a checkpoint, else started afresh."""
    if (folder / "summary.json").is_file():
        return
    from .checkpoint import latest_checkpoint
    resume = folder.is_dir() and latest_checkpoint(folder) is not None
    if folder.exists() and not resume:  # a run killed before its first checkpoint
        shutil.rmtree(folder)
    if workers == 1:
        from .run import run
        run(RunConfig.from_dict(config), folder, resume=resume)
        return
    folder.mkdir(parents=True, exist_ok=True)
    request = folder.parent / f"{folder.name}.request.json"
    request.write_text(json.dumps(config, indent=1), encoding="utf-8")
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "train", "train", "--config", str(request), "--out", str(folder),
           "--no-progress"] + (["--resume"] if resume else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"sweep run {folder} failed (exit {proc.returncode}): {tail[0]}")


def run_sweep(spec: SweepSpec, out: str | os.PathLike, workers: int = 1,
              progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Run every (cell, seed) not yet finished, then write the tables and the plot.

    Args:
        spec: the sweep (see ``load_spec``).
        out: the sweep folder; rerunning into it continues a killed sweep.
        workers: runs at once (separate processes when > 1).
        progress: called with one line per run started or skipped.
    Returns:
        The per-cell summary rows (also written to ``summary.csv``).
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}; expected an integer >= 1")
    out = Path(out)
    cells = expand(spec)
    jobs = []
    for cell in cells:
        for seed in spec.seeds:
            config = copy.deepcopy(cell.config)
            config["loop"]["seed"] = seed
            config["loop"].setdefault("progress", workers == 1)
            jobs.append((cell, seed, config, out / "runs" / cell.name / f"seed-{seed}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps({"base": spec.base, "grid": spec.grid, "cells": list(spec.cells),
                                               "seeds": list(spec.seeds), "metric": spec.metric}, indent=1))
    say = progress or (lambda line: log.info("%s", line))
    for i, (cell, seed, _, folder) in enumerate(jobs, 1):
        done = (folder / "summary.json").is_file()
        say(f"[{i}/{len(jobs)}] {cell.name} seed {seed}: {'finished, skipped' if done else 'to run'}")
    if workers == 1:
        for _, _, config, folder in jobs:
            _run_one(config, folder, 1)
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(_run_one, config, folder, workers) for _, _, config, folder in jobs]:
                f.result()
    return _write_tables(spec, jobs, out)


def _write_tables(spec: SweepSpec, jobs: list, out: Path) -> list[dict]:
    keys = list(dict.fromkeys(k for cell, *_ in jobs for k in cell.overrides))
    rows = []
    for cell, seed, _, folder in jobs:
        s = json.loads((folder / "summary.json").read_text())
        if spec.metric not in s["after"]:
            raise ValueError(f"metric {spec.metric!r} is not in {folder / 'summary.json'} "
                             f"(has {sorted(s['after'])})")
        rows.append({"cell": cell.name, **{k: cell.overrides.get(k, "") for k in keys}, "seed": seed,
                     f"{spec.metric}_before": s["before"].get(spec.metric, ""),
                     spec.metric: s["after"][spec.metric], "final_loss": s["final_loss"],
                     "s_per_step": s["s_per_step"], "trainable_params": s["trainable_params"],
                     "adapter_bytes": s["adapter_bytes"], "run_dir": str(folder)})
    _write_csv(out / "results.csv", rows)
    summary = []
    for cell in {cell.name: cell for cell, *_ in jobs}.values():
        mine = [r for r in rows if r["cell"] == cell.name]
        mean, std, low, high = mean_std_ci([float(r[spec.metric]) for r in mine])
        summary.append({"cell": cell.name, **{k: cell.overrides.get(k, "") for k in keys}, "n": len(mine),
                        "mean": mean, "std": std, "ci95_low": low, "ci95_high": high,
                        "s_per_step": sorted(r["s_per_step"] for r in mine)[len(mine) // 2]})
    _write_csv(out / "summary.csv", summary)
    (out / "summary.md").write_text(format_summary(summary, spec.metric), encoding="utf-8")
    _plot(summary, spec.metric, out / "sweep.png")
    return summary


def format_summary(summary: list[dict], metric: str) -> str:
    """A markdown table: cell, n, mean ± std, 95% interval, s/step."""
    lines = [f"| cell | n | {metric} mean ± std | 95% CI | s/step |", "|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['cell']} | {r['n']} | {r['mean']:.3f} ± {r['std']:.3f} | "
                     f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}] | {r['s_per_step']:.3f} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def _plot(summary: list[dict], metric: str, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; %s not drawn", path.name)
        return
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(summary) + 2), 3.2))
    x = range(len(summary))
    means = [r["mean"] for r in summary]
    err = [[r["mean"] - r["ci95_low"] for r in summary], [r["ci95_high"] - r["mean"] for r in summary]]
    ax.errorbar(x, means, yerr=err, fmt="o", capsize=4)
    ax.set_xticks(list(x), [r["cell"] for r in summary], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
