"""Parameter counts in peft's ``print_trainable_parameters`` format."""
from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared (tied) parameters count once.

    A uint8 parameter holds packed 4-bit weights (two per byte) and counts twice its numel,
    as peft counts bitsandbytes' ``Params4bit``.
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 if p.dtype == torch.uint8 else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """``"trainable params: T || all params: A || trainable%: P"`` (thousands separators, 4 decimals)."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
