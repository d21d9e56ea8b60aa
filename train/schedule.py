"""Learning-rate schedules as pure functions of the optimizer step.

A pure function of the step needs no state of its own to checkpoint: resuming at step N sets
the same learning rate an uninterrupted run would.
"""
from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for the update made at ``step`` (0-based).

    Warm-up rises linearly ``step / warmup`` (so the first update with warm-up uses 0), then
    ``linear`` falls to 0 at ``total``, ``cosine`` follows half a cosine to 0, ``constant`` stays 1.

    Args:
        step: index of the optimizer update, 0 <= step < total.
        total: number of optimizer updates in the run.
        warmup: warm-up updates (0 for none).
        kind: "linear", "cosine" or "constant".
    Returns:
        A factor in [0, 1].
    """
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # in [0, 1)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"schedule kind={kind!r}; expected linear, cosine or constant")
