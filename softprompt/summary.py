"""trainable_summary: peft's one-line count of trainable vs all parameters."""
from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns: (trainable, total) element counts; shared tensors are counted once."""
    trainable = total = 0
    for _, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """Returns: ``"trainable params: T || all params: A || trainable%: P"`` (peft's format; for
    classification "all" counts the backbone head and its trainable copy, as peft does)."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
