"""Bitwise comparison for exactness tests (``assert_close`` treats -0.0 and +0.0 as equal)."""
from __future__ import annotations

import torch

_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers (so -0.0 and +0.0, or two NaNs, are told apart)."""
    return t.detach().contiguous().view(_INTS[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, same shape, same bits."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), f"{int((bits(a) != bits(b)).sum())} elements differ"
