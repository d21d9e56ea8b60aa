"""Give the memory freed during a CPU training step back to the operating system.

glibc's allocator raises its mmap threshold to the size of the largest block freed so far
(up to 32 MiB), so after the first step most activations and gradients of a CPU step live on
its heap, and freed, those pages stay with the process. ``release_freed_memory`` asks glibc to
return every free page (``malloc_trim(0)`` also releases pages in the middle of the heap); the
call itself is cheap and a no-op where glibc is not the allocator. (Before NF4 matmuls reused
one dequantization buffer per weight size the kept heap also grew step after step; now it stays
flat after the first step.)

The price comes in the next step: every page handed back is faulted in and zeroed again when
the next step's tensors land on it (about 0.7 GB a step on SmolLM2, 1 GB on MiniLM at batch 16,
measured with getrusage). On 2 cores that made a MiniLM prompt-tuning step 1.27x and a SmolLM2
QLoRA step 1.17x as slow, for a peak about 20% lower (``benchmarks/bench_release.py``). So the
loop asks ``releases_each_step``: ``LoopConfig.release_memory`` "step" always hands memory back
after a CPU step, "never" leaves glibc alone (as a plain PyTorch loop does), and "auto" (the
default) hands it back only for a model holding packed 4-bit weights (a frozen uint8 parameter,
as ``lora.NF4Linear`` holds), whose user chose QLoRA to save memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

import torch

__all__ = ["RELEASE_MODES", "release_freed_memory", "releases_each_step"]

RELEASE_MODES = ("auto", "step", "never")


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[ctypes._CFuncPtr]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl without it, Windows)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the allocator's free heap pages to the OS; True when glibc did it."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0) >= 0)


def releases_each_step(mode: str, model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the loop calls ``release_freed_memory`` after every optimizer step.

    Args:
        mode: "auto" (CPU and a packed 4-bit weight in ``model``), "step" (CPU) or "never".
        model: the model being trained.
        device: where it trains; memory is only handed back on CPU.
    """
    if mode not in RELEASE_MODES:
        raise ValueError(f"release_memory={mode!r}; expected one of {RELEASE_MODES}")
    if device.type != "cpu" or mode == "never":
        return False
    return mode == "step" or any(p.dtype == torch.uint8 for p in model.parameters())
