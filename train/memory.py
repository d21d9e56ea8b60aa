"""Give the memory freed during a CPU training step back to the operating system.

glibc's allocator raises its mmap threshold to the size of the largest block freed so far
(up to 32 MiB), so after the first step most activations and gradients of a CPU step live on
its heap. When they are freed the pages stay with the process, and since the next step's
tensors do not fit the holes exactly the heap keeps growing: on SmolLM2's QLoRA the process
held a few hundred MiB of free heap after every step. ``release_freed_memory`` asks glibc to
return every free page (``malloc_trim(0)`` also releases pages in the middle of the heap); it
costs well under a millisecond per call and is a no-op where glibc is not the allocator.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

__all__ = ["release_freed_memory"]


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
