"""Fresh CPU output buffers for dequantization, backed by transparent huge pages where possible.

A dequantized 4096 x 4096 fp32 weight is 64 MiB of fresh memory: with 4 KiB pages its first
touch costs 16,384 page faults, more time than the dequantization itself. On Linux, asking the
kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``, honoured when THP is in
``madvise`` or ``always`` mode) before the first write turns that into a few dozen 2 MiB faults.
Elsewhere, or when the call fails, the buffer is an ordinary ``torch.empty``.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Optional

import torch

_HUGE = 1 << 21  # 2 MiB: the x86-64 / arm64 transparent huge page size
_MIN_BYTES = 2 * _HUGE  # smaller buffers gain nothing
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=None)
def _madvise() -> Optional[ctypes._CFuncPtr]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty_output(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype, device)``; large CPU buffers are advised to use huge pages.

    The advice only changes how the kernel backs the pages, never their contents, and is
    applied to the 2 MiB-aligned interior of the buffer before anything is written to it.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    fn = _madvise() if out.device.type == "cpu" and nbytes >= _MIN_BYTES else None
    if fn is not None:
        start = (out.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
        stop = (out.data_ptr() + nbytes) & ~(_HUGE - 1)
        if stop > start:
            fn(start, stop - start, _MADV_HUGEPAGE)  # a failure leaves ordinary pages
    return out
