"""The loss-curve picture drawn from a run's ``metrics.jsonl`` (matplotlib, optional)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .atomic import atomic_write

__all__ = ["read_metrics", "plot_loss"]

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics JSONL file (an absent file reads as empty; a torn last line is
    skipped, a corrupt line before it is a ValueError naming the line)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a torn last line (a killed write) is not a record
                log.warning("%s: ignoring a torn last line", path)
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON; the metrics log is corrupt") from None
    return records


def plot_loss(metrics_path: Path, png_path: Path, title: str = "") -> bool:
    """Draw training loss (and eval metrics when logged) against the step into a PNG.

    Args:
        metrics_path: the run's ``metrics.jsonl``.
        png_path: where to write the picture (atomically).
        title: the figure title.
    Returns:
        False when matplotlib is not installed or there is nothing to draw, else True.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss curve drawn (pip install matplotlib)")
        return False
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and "eval_loss" in r]
    if not train:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return True
