"""Ways to turn an NF4Linear's packed storage into a dense weight: the default pure-PyTorch
path and two optional accelerators that read the very same bytes and statistics.

- ``"torch"`` (default): ``lora.nf4.dequantize_nf4``, pure PyTorch, bit-exact with
  bitsandbytes, on any device.
- ``"bnb"``: bitsandbytes' own ``dequantize_4bit`` kernels, given a ``QuantState`` built from
  our state once per device. Meant for CUDA; on CPU only where bitsandbytes' kernel is right
  (last dimension a multiple of the blocksize). Needs ``bitsandbytes`` installed.
- ``"compile"``: ``dequantize_nf4`` under ``torch.compile``, whose straight-line form fuses the
  code lookup, the absmax multiply and the cast into one kernel. Same bits as ``"torch"``.

``NF4Linear(..., backend=...)`` (or ``layer.backend = ...``) picks one per layer.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .nf4 import NF4State, dequantize_nf4
from .nf4_codes import codebook, dynamic_map_8bit

__all__ = ["BACKENDS", "check_backend", "dequantize_with"]

BACKENDS = ("torch", "bnb", "compile")


def check_backend(backend: str) -> str:
    """``backend`` if it is one of ``BACKENDS`` (and usable here), else ``ValueError``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "bnb":
        try:
            import bitsandbytes.functional  # noqa: F401
        except Exception as e:  # not installed, or no kernels for this machine
            raise ValueError(f"backend='bnb' needs bitsandbytes ({type(e).__name__}: {e})") from None
    return backend


def bnb_quant_state(state: NF4State) -> Any:
    """Our state as a bitsandbytes ``QuantState`` (same tensors, no copies of the statistics)."""
    import bitsandbytes.functional as bnbF
    device = state.absmax.device
    nested = None
    if state.double_quant:
        nested = bnbF.QuantState(absmax=state.nested_absmax, code=dynamic_map_8bit().to(device),
                                 blocksize=256, dtype=torch.float32)
    return bnbF.QuantState(absmax=state.absmax, shape=state.shape,
                           code=codebook(state.quant_type, device), blocksize=state.blocksize,
                           quant_type=state.quant_type, dtype=state.dtype,
                           offset=state.offset, state2=nested)


@functools.lru_cache(maxsize=None)
def _compiled() -> Callable:
    return torch.compile(dequantize_nf4, fullgraph=True, dynamic=False)


def dequantize_with(backend: str, packed: torch.Tensor, state: NF4State, dtype: torch.dtype,
                    cache: dict) -> torch.Tensor:
    """The dense weight (``state.shape``, ``dtype``) by ``backend``.

    Args:
        cache: a per-layer dict where the "bnb" backend keeps its ``QuantState`` (rebuilt when
            the state object changes, e.g. after a device move).
    """
    if backend == "torch" or torch.compiler.is_compiling():
        return dequantize_nf4(packed, state, dtype)
    if backend == "compile":
        return _compiled()(packed, state, dtype)
    import bitsandbytes.functional as bnbF
    if packed.device.type == "cpu" and state.shape[-1] % state.blocksize:
        raise ValueError(f"backend='bnb' on CPU: bitsandbytes' CPU kernel indexes absmax per row, "
                         f"so the last dimension ({state.shape[-1]}) must be a multiple of the "
                         f"blocksize ({state.blocksize}); use backend='torch'")
    if cache.get("state") is not state:
        cache.update(state=state, bnb=bnb_quant_state(state))
    out = bnbF.dequantize_4bit(packed.reshape(-1, 1), cache["bnb"], quant_type=state.quant_type)
    return out if out.dtype == dtype else out.to(dtype)
