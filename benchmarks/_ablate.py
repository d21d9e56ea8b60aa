"""Shared machinery of the ablation scripts: one small training run -> held-out accuracy.

Every trial trains one adapter on the bundled Rotten Tomatoes data (sentiment, 2 classes) with
the `train` package (the same loop as `python -m train`) on the bundled MiniLM, then measures
accuracy on held-out snippets. Results go to a CSV and a PNG plot (accuracy vs the knob).
"""
from __future__ import annotations

import csv
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

import _common  # noqa: F401  (puts the repository root on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Budget:
    steps: int = 60          # optimizer steps per trial
    batch_size: int = 16     # examples per step
    max_length: int = 64     # tokens per snippet (most are shorter)
    max_train: int = 0       # 0 = the whole training split
    max_eval: int = 400      # held-out examples scored
    precision: str = "fp32"  # loop autocast: fp32 | bf16
    seed: int = 0


QUICK = Budget(steps=3, batch_size=8, max_train=64, max_eval=32)


def budget_args(parser, default: Budget = Budget()) -> None:
    """Add --steps / --batch-size / --max-eval / --seed / --out to a parser."""
    parser.add_argument("--steps", type=int, default=default.steps)
    parser.add_argument("--batch-size", type=int, default=default.batch_size)
    parser.add_argument("--max-eval", type=int, default=default.max_eval)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and PNG")


def budget_from(args) -> Budget:
    if args.quick:
        return QUICK
    return Budget(steps=args.steps, batch_size=args.batch_size, max_eval=args.max_eval,
                  seed=args.seed)


_DATA_CACHE: dict = {}


def _data(tokenizer, budget: Budget):
    """Encoded (train, held-out) examples of the bundled data, cached per budget."""
    from train.data import encode_labels, encode_text, label_set, read_records, resolve_data, split_records

    key = (id(tokenizer), budget.max_length, budget.seed)
    if key not in _DATA_CACHE:
        records = read_records(resolve_data("rotten_tomatoes"))
        records = encode_labels(records, label_set(records, num_labels=2))
        train, held = split_records(records, eval_fraction=0.2, seed=budget.seed)
        enc = lambda rs: [encode_text(tokenizer, r, budget.max_length) for r in rs]  # noqa: E731
        _DATA_CACHE[key] = (enc(train), enc(held))
    train, held = _DATA_CACHE[key]
    if budget.max_train:
        train = train[:budget.max_train]
    return train, held[:budget.max_eval]


@torch.no_grad()
def accuracy(model: torch.nn.Module, examples: list, collate, batch_size: int = 64) -> float:
    """Share of held-out examples whose argmax logit is the label."""
    model.eval()
    right = 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size])
        labels = batch.pop("labels")
        right += int((model(**batch).logits.argmax(-1) == labels).sum())
    return right / max(1, len(examples))


def run_trial(budget: Budget, base_dtype: torch.dtype = torch.float32, lr: float = 0.0,
              **model_fields) -> dict:
    """Train one adapter on MiniLM + Rotten Tomatoes and score it.

    Args:
        budget: steps, batch, lengths, precision, seed.
        base_dtype: dtype of the frozen backbone (bf16 for the "bf16 base" ablation).
        lr: peak learning rate; 0 = the method's default (train.config.default_lr).
        **model_fields: train.config.ModelConfig fields (method, n_virtual, encoder, lora_r...).
    Returns:
        {"accuracy", "trainable", "seconds", "s_per_step", "final_loss"}.
    """
    from train.adapters import build_adapted
    from train.config import LoopConfig, ModelConfig, default_lr
    from train.data import PadCollator
    from train.loop import train
    from train.models import load_backbone, load_tokenizer, resolve_model

    cfg = ModelConfig(model="minilm", **model_fields)
    folder = resolve_model(cfg.model)
    tokenizer = load_tokenizer(folder)
    train_ex, held = _data(tokenizer, budget)
    collate = PadCollator(pad_id=tokenizer.pad_token_id)
    torch.manual_seed(budget.seed)
    model = build_adapted(load_backbone(folder, "seq_cls", dtype=base_dtype), cfg, "seq_cls",
                          tokenizer=tokenizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loop = LoopConfig(steps=budget.steps, batch_size=budget.batch_size, precision=budget.precision,
                      seed=budget.seed, progress=False, log_every=max(1, budget.steps // 4),
                      device="cpu", warmup_steps=max(1, budget.steps // 10))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(model, train_ex, collate, loop, Path(run_dir), lr or default_lr(cfg.method))
    seconds = time.perf_counter() - t0
    amp = {"bf16": torch.bfloat16}.get(budget.precision)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        acc = accuracy(model, held, collate)
    return {"accuracy": round(acc, 4), "trainable": trainable, "seconds": round(seconds, 1),
            "s_per_step": round(result.seconds_per_step, 3),
            "final_loss": round(result.final_loss, 4)}


def write_csv(rows: list[dict], path: Path) -> Path:
    """Write result rows (dicts with the same keys) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def plot(rows: list[dict], x: str, series: str, path: Path, title: str,
         log_x: bool = False, categorical: bool = False) -> Path:
    """Accuracy vs `x`, one line per value of `series`; saved as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r[series] for r in rows):
        pts = [r for r in rows if r[series] == name]
        xs = [str(r[x]) for r in pts] if categorical else [r[x] for r in pts]
        ax.plot(xs, [r["accuracy"] for r in pts], marker="o", label=str(name))
    if log_x and not categorical:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def finish(rows: list[dict], name: str, out: Path, x: str, series: str, title: str,
           write_docs: bool = False, **plot_kw) -> None:
    """Print the rows as a table, write <out>/<name>.csv and <out>/<name>.png, and (with
    write_docs) the table and plot link into docs/benchmarks.md's section `name`."""
    from _common import markdown_table

    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    print("wrote", write_csv(rows, out / f"{name}.csv"))
    print("wrote", plot(rows, x, series, out / f"{name}.png", title, **plot_kw))
    if write_docs:
        publish(name, title, rows, out)


def publish(name: str, title: str, rows: list[dict], out: Path = RESULTS) -> None:
    """Put an ablation's table and plot link into its docs/benchmarks.md section."""
    from _common import BENCH_DOC, header, markdown_table, write_section

    keep = [k for k in rows[0] if k not in ("threads",)]
    table = markdown_table(keep, [[r[k] for k in keep] for r in rows])
    png = os.path.relpath(out / f"{name}.png", BENCH_DOC.parent)
    body = (f"### {title}\n\n{header(int(rows[0].get('threads', 0)))}\n\n{table}\n\n"
            f"![{title}]({png})\n")
    write_section(name, body)


def sweep(values: Sequence, quick: bool, n_quick: int = 2) -> list:
    """The knob values of a run: the first and last ones only in --quick mode."""
    values = list(values)
    return [values[0], values[-1]][:n_quick] if quick and len(values) > 1 else values
