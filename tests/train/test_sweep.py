"""The sweep runner: grid expansion, statistics on known numbers, resumable cells, the CLI."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from tests.models import tiny_bert_classifier, tiny_tokenizer
from train.cli import main
from train.sweep import SweepSpec, expand, load_spec, mean_std_ci, run_sweep, t_quantile_975


def _t_cdf_minus_half(x: float, df: int, n: int = 20000) -> float:
    """P(0 < T < x) for Student's t by Simpson's rule on its density (independent of the table)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
    h = x / n
    s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    return s * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 30, 60])
def test_t_quantile_is_the_975_point(df):
    # the tabulated value leaves 2.5% in the upper tail (1e-4 absolute: 4 decimals in the table;
    # the Cornish-Fisher value past df=30 is good to ~1e-4 as well)
    assert _t_cdf_minus_half(t_quantile_975(df), df) == pytest.approx(0.475, abs=1e-4)


def test_mean_std_and_interval_on_known_numbers():
    values = [0.70, 0.72, 0.74, 0.78]
    mean, std, low, high = mean_std_ci(values)
    assert mean == pytest.approx(statistics.mean(values), rel=1e-12)
    assert std == pytest.approx(statistics.stdev(values), rel=1e-12)  # n - 1 in the denominator
    half = 3.1824 * statistics.stdev(values) / 2  # t_{0.975,3} * s / sqrt(4)
    assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-12)
    assert mean_std_ci([0.5]) == (0.5, 0.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="no values"):
        mean_std_ci([])


def _spec(**kw) -> SweepSpec:
    base = {"model": {"method": "lora", "model": "M"}, "data": {"data": "D", "task": "classify"},
            "loop": {"steps": 2, "batch_size": 4}}
    return SweepSpec(base=kw.get("base", base), grid=kw.get("grid", {}), cells=tuple(kw.get("cells", ())),
                     seeds=tuple(kw.get("seeds", (0,))), metric="accuracy")


def test_grid_times_cells_expansion_and_names():
    cells = expand(_spec(grid={"model.lora_r": [2, 4], "loop.lr": [0.01]},
                         cells=[{"model.method": "lora"}, {"model.method": "qlora"}]))
    assert [c.name for c in cells] == ["method=lora,lora_r=2,lr=0.01", "method=lora,lora_r=4,lr=0.01",
                                       "method=qlora,lora_r=2,lr=0.01", "method=qlora,lora_r=4,lr=0.01"]
    assert cells[3].config["model"] == {"method": "qlora", "model": "M", "lora_r": 4}
    assert cells[3].config["loop"]["lr"] == 0.01 and "seed" not in cells[3].config["loop"]


@pytest.mark.parametrize("kw, match", [
    ({"grid": {"model.lora_rank": [2]}}, "lora_rank"),
    ({"grid": {"loop.seed": [1, 2]}}, "loop.seed"),
    ({"grid": {"lora_r": [2]}}, "'lora_r'"),
    ({"grid": {"model.lora_r": [0]}}, "lora_r=0"),
    ({"grid": {"model.lora_r": []}}, "model.lora_r"),
    ({"seeds": ()}, "seeds"),
    ({"seeds": (1, 1)}, "distinct"),
    ({"cells": [{"model.lora_r": 2}, {"model.lora_r": 2}]}, "twice"),
])
def test_bad_specs_name_the_bad_entry(kw, match):
    with pytest.raises(ValueError, match=match):
        expand(_spec(**kw))


def test_load_spec_errors_name_the_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"base": {}, "grids": {}}')
    with pytest.raises(ValueError, match=r"spec\.json.*grids"):
        load_spec(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"spec\.json.*not valid JSON"):
        load_spec(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_spec(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tiny_bert_classifier(num_labels=2).save_pretrained(root / "bert")
    tiny_tokenizer().save_pretrained(root / "bert")
    texts = ["the movie was great", "a dull , boring film", "wonderful acting", "far too long"]
    (root / "reviews.csv").write_text("text,label\n" + "".join(f'"{t} {i}",{i % 2}\n' for i, t in enumerate(texts * 5)))
    spec = {"base": {"model": {"method": "lora", "model": str(root / "bert")},
                     "data": {"data": str(root / "reviews.csv"), "task": "classify"},
                     "loop": {"steps": 2, "batch_size": 4, "log_every": 1, "progress": False}},
            "grid": {"model.lora_r": [2, 4]}, "seeds": [0, 1], "metric": "accuracy"}
    (root / "spec.json").write_text(json.dumps(spec))
    return root


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_runs_rows_and_statistics_then_skips_finished_cells(setup, tmp_path):
    out = tmp_path / "sweep"
    lines = []
    summary = run_sweep(load_spec(setup / "spec.json"), out, progress=lines.append)
    rows = _csv(out / "results.csv")
    assert [(r["cell"], r["seed"]) for r in rows] == [("lora_r=2", "0"), ("lora_r=2", "1"),
                                                      ("lora_r=4", "0"), ("lora_r=4", "1")]
    for r in rows:  # each cell is a normal run folder
        run = json.loads((out / "runs" / r["cell"] / f"seed-{r['seed']}" / "summary.json").read_text())
        assert float(r["accuracy"]) == run["after"]["accuracy"]
        cfg = json.loads((out / "runs" / r["cell"] / f"seed-{r['seed']}" / "config.json").read_text())
        assert cfg["loop"]["seed"] == int(r["seed"]) and cfg["model"]["lora_r"] == int(r["model.lora_r"])
    for s in summary:
        accs = [float(r["accuracy"]) for r in rows if r["cell"] == s["cell"]]
        assert s["n"] == 2 and s["mean"] == pytest.approx(statistics.mean(accs), rel=1e-12)
        assert s["std"] == pytest.approx(statistics.stdev(accs), rel=1e-12, abs=1e-15)
    assert len(_csv(out / "summary.csv")) == 2 and (out / "summary.md").is_file() and (out / "sweep.png").is_file()

    # a killed sweep: one run never started, one died before its first checkpoint
    import shutil
    shutil.rmtree(out / "runs" / "lora_r=4" / "seed-1")
    half = out / "runs" / "lora_r=4" / "seed-0"
    shutil.rmtree(half)
    half.mkdir()
    (half / "config.json").write_text("{}")
    # and one died after its last checkpoint, before writing its summary: it is resumed, not redone
    resumed = out / "runs" / "lora_r=2" / "seed-1"
    (resumed / "summary.json").unlink()
    metrics = (resumed / "metrics.jsonl").read_text()
    kept = {p: p.stat().st_mtime_ns for p in (out / "runs" / "lora_r=2").glob("seed-*/summary.json")}
    lines.clear()
    again = run_sweep(load_spec(setup / "spec.json"), out, progress=lines.append)
    assert sum("finished, skipped" in ln for ln in lines) == 1 and sum("to run" in ln for ln in lines) == 3
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the finished cell was not rerun
    assert (resumed / "metrics.jsonl").read_text() == metrics and (resumed / "summary.json").is_file()
    # seeded runs are deterministic: the rerun cells give the same numbers
    assert [(s["cell"], s["mean"]) for s in again] == [(s["cell"], s["mean"]) for s in summary]


def test_sweep_cli_with_two_worker_processes(setup, tmp_path, capsys):
    spec = json.loads((setup / "spec.json").read_text())
    spec["grid"] = {"model.lora_r": [2]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert main(["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "s"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "| lora_r=2 | 2 |" in out
    assert [r["seed"] for r in _csv(tmp_path / "s" / "results.csv")] == ["0", "1"]


def test_sweep_cli_bad_spec_is_one_error_line(tmp_path, capsys):
    (tmp_path / "spec.json").write_text('{"grid": {"model.nope": [1]}}')
    assert main(["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "sweeps").glob("*.json")),
                         ids=lambda p: p.name)
def test_shipped_sweep_specs_are_valid(path):
    cells = expand(load_spec(path))
    assert len(cells) >= 2 and len(load_spec(path).seeds) >= 3
