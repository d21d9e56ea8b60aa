"""Parameter counts in peft's ``print_trainable_parameters`` format."""
from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared (tied) parameters count once.

    4-bit weights count as the number of weights they stand for, as peft counts bitsandbytes'
    ``Params4bit``: a uint8 parameter (two codes per byte) counts twice its numel, and a quantized
    linear-like module whose packed weight is a uint8 buffer counts ``in_features * out_features``.
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 if p.dtype == torch.uint8 else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    for m in model.modules():
        packed = m._buffers.get("weight")
        if isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8 and hasattr(m, "in_features"):
            total += int(m.in_features) * int(m.out_features)
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """``"trainable params: T || all params: A || trainable%: P"`` (thousands separators, 4 decimals)."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
