"""``python -m train demo`` / ``make demo``: every method on the bundled data, one table.

MiniLM-L6 learns Rotten Tomatoes sentiment as a classifier with each method (the head-only
baseline, prompt tuning, P-Tuning, prefix tuning, LoRA, QLoRA, IA3); SmolLM2-135M-Instruct learns the
same labels as an instruction task with LoRA, rendered as a user would get it by default: with the
model's own chat template (user turn "Is the sentiment ... positive or negative?\\n<review>",
assistant turn "positive" / "negative"), scored by comparing the two answer tokens' logits.
Accuracy is measured on the held-out split before and after training.

The default budget takes about 17 minutes on a 2-vCPU AMD EPYC (P-Tuning's 800 steps are a
third of it; steps ran 1.5-1.7x faster on a 2-vCPU Intel Xeon); ``--full`` runs the longer anchor
budget (400 steps of batch 16 for MiniLM, 300 of batch 8 for SmolLM2).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from .adapters import qlora_available
from .checkpoint import write_json_atomic
from .config import DataConfig, LoopConfig, ModelConfig, RunConfig
from .plot import read_metrics
from .run import prepare, run

__all__ = ["demo_rows", "run_demo", "format_table", "format_budget"]

log = logging.getLogger(__name__)

# Budgets per row: MiniLM rows take mini_steps (or their entry in "steps") at their "lr"; SmolLM2
# (steps, lr, held-out prompts scored). The default runs with bf16 autocast (timings in
# docs/training.md); the soft-prompt rows' steps, learning rates and P-Tuning's encoder come from the
# sweeps benchmarks/sweeps/demo_softprompt.json, demo_ptuning.json, demo_ptuning_encoder.json and
# demo_ptuning_lstm.json (3 seeds each, docs/benchmarks.md; LSTM at 800 steps: 0.758 ± 0.006).
# --full is the anchor budget in fp32 (400 steps of batch 16; SmolLM2 300 steps of batch 8 at 2e-4).
_QUICK = {"precision": "bf16", "mini_steps": 200, "steps": {"prompt": 300, "ptuning": 800},
          "smol": (80, 1e-3, 200),
          "lr": {"head": 1e-2, "prompt": 3e-1, "ptuning": 1e-2, "prefix": 1e-2, "lora": 2e-3, "qlora": 2e-3, "ia3": 1e-2}}
_FULL = {"precision": "fp32", "mini_steps": 400, "steps": {}, "smol": (300, 2e-4, 400),
         "lr": {"head": 1e-2, "prompt": 3e-2, "ptuning": 1e-2, "prefix": 1e-2, "lora": 5e-4, "qlora": 5e-4, "ia3": 1e-2}}


def demo_rows(full: bool = False) -> dict[str, RunConfig]:
    """Row name -> the run config of that row."""
    b = _FULL if full else _QUICK
    mini_data = DataConfig(data="rotten_tomatoes", task="classify", max_length=64)

    def mini(method: str, **model) -> RunConfig:
        loop = LoopConfig(steps=b["steps"].get(method, b["mini_steps"]), batch_size=16, lr=b["lr"][method],
                          precision=b["precision"], log_every=10)
        return RunConfig(ModelConfig(method=method, **model), mini_data, loop)
    lora_knobs = dict(lora_r=8, lora_alpha=8, target_modules=("query", "value"))
    smol_steps, smol_lr, smol_eval = b["smol"]
    return {
        "head": mini("head"),
        "prompt": mini("prompt", n_virtual=20),
        "ptuning": mini("ptuning", n_virtual=20, encoder="lstm"),
        "prefix": mini("prefix", n_virtual=20),
        "lora": mini("lora", **lora_knobs),
        "qlora": mini("qlora", **lora_knobs),
        "ia3": mini("ia3"),  # bert defaults: key, value, output.dense (feed-forward side)
        "smollm2-lora": RunConfig(
            ModelConfig(method="lora", model="smollm2", lora_r=8, lora_alpha=16, target_modules=("q_proj", "v_proj")),
            DataConfig(data="rotten_tomatoes", task="instruct", template="auto", max_length=96,
                       max_eval=smol_eval),  # auto: SmolLM2-Instruct's own chat template
            LoopConfig(steps=smol_steps, batch_size=8, lr=smol_lr, precision=b["precision"], log_every=5)),
    }


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KB"


def format_table(results: dict[str, dict]) -> str:
    """The demo's markdown table, one row per trained adapter."""
    head = ("| run | method | model | trainable params | adapter file | s/step | acc before | acc after |\n"
            "|---|---|---|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, s in results.items():
        lines.append(f"| {name} | {s['method']} | {s['model']} | {s['trainable_params']:,} | "
                     f"{_kb(s['adapter_bytes'])} | {s['s_per_step']:.3f} | "
                     f"{s['before'].get('accuracy', float('nan')):.3f} | {s['after'].get('accuracy', float('nan')):.3f} |")
    return "\n".join(lines)


def _method_knobs(m: ModelConfig) -> str:
    """The knobs a row's method was tuned on, as words ("" for methods without any here)."""
    if m.method in ("prompt", "ptuning", "prefix"):
        return f", {m.n_virtual} virtual tokens" + (f", {m.encoder} encoder" if m.method == "ptuning" else "")
    if m.method in ("lora", "qlora"):
        return f", r {m.lora_r} alpha {m.lora_alpha:g} on {'+'.join(m.target_modules)}"
    return ""


def format_budget(rows: dict[str, RunConfig]) -> str:
    """One line per row: steps, batch, learning rate, precision and the method's own knobs
    (virtual tokens, P-Tuning's encoder, LoRA's rank and targets), to print under the table."""
    return "\n".join(f"- {name}: {cfg.loop.steps} steps of batch {cfg.loop.batch_size}, lr {cfg.lr:g}, "
                     f"{cfg.loop.precision}{_method_knobs(cfg.model)}" for name, cfg in rows.items())


def _plot_all(out: Path, names: Sequence[str]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        train = [r for r in read_metrics(out / name / "metrics.jsonl") if r.get("kind") == "train"]
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)


def run_demo(out: Optional[Path] = None, full: bool = False, only: Optional[Sequence[str]] = None) -> dict:
    """Train every demo row, print the table, write ``results.md``/``results.json`` and plots.

    Args:
        out: the demo folder (default ``runs/demo-<time>``); each row gets a sub-folder.
        full: the longer anchor budget.
        only: run just these row names.
    Returns:
        Row name -> run summary.
    """
    rows = demo_rows(full)
    if only:
        unknown = sorted(set(only) - set(rows))
        if unknown:
            raise ValueError(f"--only {unknown}: unknown row(s); expected some of {list(rows)}")
        rows = {k: v for k, v in rows.items() if k in only}
    if "qlora" in rows and not qlora_available():
        print("note: skipping qlora: this lora package has no quantize_model")
        rows.pop("qlora")
    out = Path(out) if out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    prepared = {name: prepare(cfg) for name, cfg in rows.items()}  # every input checked before any write
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for name, cfg in rows.items():
        print(f"== {name}: {cfg.model.method} on {cfg.model.model}, {cfg.loop.steps} steps of batch "
              f"{cfg.loop.batch_size}, lr {cfg.lr:g}", flush=True)
        results[name] = run(cfg, out / name, prepared=prepared[name])
        s = results[name]
        print(f"   accuracy {s['before'].get('accuracy', float('nan')):.3f} -> "
              f"{s['after'].get('accuracy', float('nan')):.3f}, {s['s_per_step']:.3f} s/step", flush=True)
    wall = time.perf_counter() - t0
    table = format_table(results)
    budget = "full" if full else "default"
    budget_lines = format_budget(rows)
    held = ", ".join(f"{name} {len(prepared[name].held)}" for name in results)
    text = (f"# purepeft demo ({budget} budget)\n\nHeld-out accuracy on the bundled Rotten Tomatoes test split "
            f"(examples scored: {held}). Wall time {wall:.0f} s.\n\n{table}\n\nBudget:\n\n{budget_lines}\n")
    (out / "results.md").write_text(text)
    write_json_atomic(out / "results.json", {"wall_seconds": wall, "budget": budget, "rows": results})
    _plot_all(out, list(results))
    print()
    print(table)
    print(f"\nbudget:\n{budget_lines}")
    print(f"\nwall time: {wall:.0f} s; results and plots in {out}")
    return results
