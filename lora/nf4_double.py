"""Double quantization: the 8-bit blockwise step that stores QLoRA's absmax vector.

The fp32 absmax vector (one value per 4-bit block) minus its mean is cut into blocks of 256,
each scaled by its own fp32 absmax and rounded to bitsandbytes' signed 8-bit dynamic codebook.
bitsandbytes rounds differently on CPU (a 65,536-bin lookup table) and on CUDA (exact nearest);
``rounding=`` picks either, ``"auto"`` follows the tensor's device.
"""
from __future__ import annotations

import torch

from .nf4_codes import LUT_BINS, midpoints, table

__all__ = ["NESTED_BLOCKSIZE", "ROUNDINGS", "check_rounding", "quantize_blockwise_8bit",
           "dequantize_blockwise_8bit"]

NESTED_BLOCKSIZE = 256  # first-level absmax values per nested fp32 absmax
ROUNDINGS = ("auto", "cpu", "cuda")


def check_rounding(rounding: str, device: torch.device) -> str:
    """``rounding`` resolved to "cpu" or "cuda" ("auto" follows ``device``)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: expected one of {ROUNDINGS}")
    if rounding == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    return rounding


def quantize_blockwise_8bit(x: torch.Tensor, rounding: str = "auto",
                            blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic codebook (the double-quant step).

    Args:
        x: finite fp32 tensor [n], n > 0 (the mean-centred absmax vector).
        rounding: "cpu" (bitsandbytes-CPU lookup table), "cuda" (exact nearest) or "auto".
        blocksize: elements per block (bitsandbytes uses 256).
    Returns:
        (codes uint8 [n], absmax fp32 [ceil(n / blocksize)]).
    Raises:
        ValueError: ``x`` is empty or holds NaN/inf.
    """
    rounding = check_rounding(rounding, x.device)
    n = x.numel()
    if n == 0:
        raise ValueError("quantize_blockwise_8bit: x is empty; expected at least one value")
    nblocks = -(-n // blocksize)
    flat = torch.nn.functional.pad(x.reshape(-1).float(), (0, nblocks * blocksize - n))
    blocks = flat.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # [nblocks]
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("quantize_blockwise_8bit: x holds NaN or inf values; expected finite")
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1.0, 1.0)
    if rounding == "cuda":
        mids, _ = midpoints(table("dynamic8", x.device))
        codes = torch.bucketize(scaled, mids, right=False).to(torch.uint8)
    else:
        # bin = trunc((s + 1) * 0.5 * 65535 + 0.5) in fp32, then the table; empty blocks -> code 0
        bins = ((scaled + 1.0) * 0.5 * float(LUT_BINS - 1) + 0.5).to(torch.int64)
        codes = table("lut8", x.device)[bins]
        codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_8bit``: fp32 [n] = dyn[codes] * absmax[i // blocksize].

    Raises:
        ValueError: ``codes`` is not uint8, or ``absmax`` does not hold one fp32 value per block.
    """
    n = codes.numel()
    nblocks = -(-n // blocksize)
    if codes.dtype != torch.uint8:
        raise ValueError(f"8-bit codes have dtype {codes.dtype}; expected torch.uint8")
    if absmax.dtype != torch.float32 or absmax.numel() != nblocks:
        raise ValueError(f"nested absmax: {absmax.numel()} {absmax.dtype} values for {n} codes; "
                         f"expected {nblocks} float32 (one per block of {blocksize})")
    values = table("dynamic8", codes.device)[codes.reshape(-1).long()]
    if nblocks * blocksize != n:
        values = torch.nn.functional.pad(values, (0, nblocks * blocksize - n))
    return (values.view(nblocks, blocksize) * absmax.reshape(-1, 1)).view(-1)[:n]
