"""The loss-curve picture drawn from a run's ``metrics.jsonl`` (matplotlib, optional)."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

__all__ = ["read_metrics", "plot_loss"]

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics JSONL file (an absent file reads as empty)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    fd, tmp = tempfile.mkstemp(prefix=png_path.name + ".", suffix=".png", dir=png_path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.chmod(tmp, 0o644)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True
