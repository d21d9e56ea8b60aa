"""4-bit NormalFloat (NF4) and FP4 blockwise quantization, bit-exact with bitsandbytes.

A weight is flattened row-major and cut into blocks of ``blocksize`` consecutive elements (the
last one may be partial). Per block: fp32 absmax, scale by its reciprocal, pick the nearest of
16 codebook values by comparing with the fp32 midpoints (a tie goes to the lower code), and pack
two 4-bit codes per byte, the first element in the high nibble.

The codebooks and lookup tables live in ``lora.nf4_codes``; double quantization (the absmax
vector stored in 8 bits) in ``lora.nf4_double``. Both are re-exported here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .nf4_alloc import empty_output
from .nf4_codes import (NF4_VALUES, QUANT_TYPES, check_quant_type, codebook, dynamic_map_8bit,
                        midpoints, table, warm_tables)
from .nf4_double import (NESTED_BLOCKSIZE, ROUNDINGS, check_rounding, dequantize_blockwise_8bit,
                         quantize_blockwise_8bit)

__all__ = ["NF4State", "quantize_nf4", "dequantize_nf4", "bits_per_parameter", "BLOCKSIZES",
           "NF4_VALUES", "QUANT_TYPES", "NESTED_BLOCKSIZE", "ROUNDINGS", "codebook",
           "dynamic_map_8bit", "warm_tables", "quantize_blockwise_8bit",
           "dequantize_blockwise_8bit"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# packed bytes per dequantization chunk: on CPU the fp32 output chunk stays in L2; on CUDA a
# few large chunks bound the index/pair temporaries (12 bytes per packed byte)
_CHUNK_BYTES = {"cpu": 1 << 16, "other": 1 << 22}


@dataclasses.dataclass(frozen=True)
class NF4State:
    """Everything besides the packed bytes that dequantization needs (bitsandbytes' QuantState).

    Tensors live on the device of the packed weight; ``to(device)`` moves them together.
    Construction checks that the statistics fit the shape (one absmax per block).
    """
    absmax: torch.Tensor  # fp32 [nblocks]; uint8 [nblocks] 8-bit codes when double-quantized
    shape: torch.Size  # original weight shape, e.g. [out, in]
    dtype: torch.dtype  # original weight dtype (the default dequantization dtype)
    blocksize: int = 64  # elements per first-level block
    quant_type: str = "nf4"  # "nf4" or "fp4"
    offset: Optional[torch.Tensor] = None  # 0-d fp32 mean of the absmax vector (double quant)
    nested_absmax: Optional[torch.Tensor] = None  # fp32 [ceil(nblocks/256)] (double quant)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize}: expected one of {BLOCKSIZES}")
        check_quant_type(self.quant_type)
        if self.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype={self.dtype}: expected one of {_FLOAT_DTYPES}")
        if self.numel == 0:
            raise ValueError(f"shape={tuple(self.shape)} is empty; expected at least one weight")
        if (self.offset is None) != (self.nested_absmax is None):
            raise ValueError("offset and nested_absmax must be given together (double quant)")
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != self.nblocks:
            raise ValueError(
                f"absmax: {self.absmax.numel()} {self.absmax.dtype} values; shape "
                f"{tuple(self.shape)} in blocks of {self.blocksize} needs {self.nblocks} {want}"
                f"{' (8-bit codes: double quant)' if self.double_quant else ''}")
        if self.double_quant:
            nested = -(-self.nblocks // NESTED_BLOCKSIZE)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != nested:
                raise ValueError(f"nested_absmax: {self.nested_absmax.numel()} "
                                 f"{self.nested_absmax.dtype} values; expected {nested} float32 "
                                 f"(one per {NESTED_BLOCKSIZE} blocks)")
            if self.offset.numel() != 1:
                raise ValueError(f"offset: {self.offset.numel()} values; expected one")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def to(self, device: torch.device | str) -> "NF4State":
        """The same state with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, absmax=move(self.absmax), offset=move(self.offset),
                                   nested_absmax=move(self.nested_absmax))

    def nbytes(self) -> int:
        """Bytes of the quantization statistics (not the packed codes)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.absmax, self.offset, self.nested_absmax) if t is not None)

    def absmax_fp32(self) -> torch.Tensor:
        """The fp32 per-block absmax [nblocks], undoing double quantization if present."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax) + self.offset


def check_packed(packed: torch.Tensor, state: NF4State) -> None:
    """Raise ``ValueError`` unless ``packed`` holds the uint8 codes that ``state`` describes."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes have dtype {packed.dtype}; expected torch.uint8 "
                         f"(two 4-bit codes per byte, as quantize_nf4 returns them)")
    need = (state.numel + 1) // 2
    if packed.numel() != need:
        raise ValueError(f"packed holds {packed.numel()} bytes; shape {tuple(state.shape)} "
                         f"({state.numel} weights) needs {need}")
    if packed.device != state.absmax.device:
        raise ValueError(f"packed is on {packed.device} but its absmax on "
                         f"{state.absmax.device}; move them together (state.to(device))")


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 quant_type: str = "nf4", rounding: str = "auto",
                 ) -> tuple[torch.Tensor, NF4State]:
    """Blockwise 4-bit quantization (bitsandbytes ``quantize_4bit``).

    Args:
        weight: non-empty, finite fp32/bf16/fp16 tensor of any shape (flattened row-major).
        blocksize: one of ``BLOCKSIZES``.
        double_quant: also quantize the absmax vector to 8 bits (``compress_statistics``).
        quant_type: "nf4" or "fp4".
        rounding: "cpu" copies bitsandbytes-CPU (lookup-table double quant, division in the
            last partial block); "cuda" copies the CUDA kernel (exact nearest, reciprocal);
            "auto" picks by ``weight.device``.
    Returns:
        (packed uint8 [(numel + 1) // 2, 1], NF4State).
    Raises:
        ValueError: bad dtype/blocksize/quant_type/rounding, an empty weight, or NaN/inf in it.
    """
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight dtype {weight.dtype}: expected float32, bfloat16 or float16")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize}: expected one of {BLOCKSIZES}")
    if weight.numel() == 0:
        raise ValueError(f"weight of shape {tuple(weight.shape)} is empty; nothing to quantize")
    rounding = check_rounding(rounding, weight.device)
    code = codebook(quant_type, weight.device)
    mids, order = midpoints(code)
    flat = weight.detach().reshape(-1)  # [n] in the input dtype
    n = flat.numel()
    nblocks = -(-n // blocksize)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=weight.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    # chunks of whole blocks keep the fp32 temporaries small and in cache: [rows, blocksize]
    step = max(1, (1 << 18) // blocksize) * blocksize if weight.device.type == "cpu" else n
    for start in range(0, n, step):
        stop = min(start + step, n)
        codes = _quantize_span(flat[start:stop], blocksize, mids, absmax[start // blocksize:],
                               rounding, start)
        if quant_type != "nf4":
            codes = order.to(torch.uint8)[codes.long()]
        if codes.numel() % 2:  # odd numel: the missing element is quantized 0.0
            zero = torch.bucketize(torch.zeros(1, device=codes.device), mids).to(torch.uint8)
            codes = torch.cat([codes, order.to(torch.uint8)[zero.long()]])
        packed[start // 2: start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
    state = NF4State(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                     quant_type=quant_type)
    if double_quant:
        offset = absmax.mean()
        q8, nested = quantize_blockwise_8bit(absmax - offset, rounding)
        state = dataclasses.replace(state, absmax=q8, offset=offset, nested_absmax=nested)
    return packed.unsqueeze(1), state


def _quantize_span(x: torch.Tensor, blocksize: int, mids: torch.Tensor, absmax_out: torch.Tensor,
                   rounding: str, first: int) -> torch.Tensor:
    """Codes (uint8 [len(x)]) of a span starting on a block boundary; writes its absmax values.

    "cpu" follows bitsandbytes' CPU path: absmax clamped to >= 1e-38 before the reciprocal (the
    partial last block stores the clamped value and divides). "cuda" follows the CUDA kernel:
    a plain reciprocal, so an all-zero block gives 0 * inf = NaN, which its decision tree sends
    to code 0. ``first`` is the span's flat index in the weight (for error messages).
    """
    m = x.numel()
    nfull = m // blocksize
    xf = x.float()
    parts = []
    if nfull:
        blocks = xf[: nfull * blocksize].view(nfull, blocksize)
        amax = blocks.abs().amax(dim=1)  # [nfull]; NaN/inf propagate into it
        _check_finite(amax, xf, first)
        absmax_out[:nfull] = amax
        recip = 1.0 / (amax.clamp(min=1e-38) if rounding == "cpu" else amax)
        parts.append(_codes(blocks * recip.unsqueeze(1), mids, rounding))
    if m > nfull * blocksize:
        tail = xf[nfull * blocksize:]
        amax = tail.abs().amax()
        _check_finite(amax, xf, first)
        if rounding == "cpu":
            amax = amax.clamp(min=1e-38)
            scaled = tail / amax
        else:
            scaled = tail * (1.0 / amax)
        absmax_out[nfull] = amax
        parts.append(_codes(scaled, mids, rounding))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_finite(amax: torch.Tensor, x: torch.Tensor, first: int) -> None:
    """Raise ``ValueError`` naming the first NaN/inf of ``x`` if ``amax`` is not finite."""
    if not bool(torch.isfinite(amax).all()):
        i = int(torch.nonzero(~torch.isfinite(x))[0, 0])
        raise ValueError(f"weight holds a non-finite value ({float(x[i])} at flat index "
                         f"{first + i}); NF4 quantization needs finite weights")


def _codes(scaled: torch.Tensor, mids: torch.Tensor, rounding: str) -> torch.Tensor:
    """Nearest code by the fp32 midpoints (ties to the lower code). NaN (an all-zero block on
    "cuda": 0 * inf) goes to code 0, as the CUDA kernel's decision tree does."""
    scaled = scaled.clamp_(-1.0, 1.0).reshape(-1)
    if rounding == "cuda":
        scaled = torch.nan_to_num(scaled, nan=-1.0)
    return torch.bucketize(scaled, mids, right=False).to(torch.uint8)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of ``quantize_nf4``: code value (fp32) * absmax (fp32), one cast to ``dtype``.

    Args:
        packed: uint8 [(numel + 1) // 2, 1] (any shape of exactly those bytes).
        state: the quantization state (on ``packed``'s device).
        dtype: output dtype; defaults to ``out``'s dtype, else the original weight dtype.
        out: optional contiguous tensor of ``state.numel`` elements to write into (reusing a
            buffer saves the page faults of a fresh allocation).
    Returns:
        Tensor of ``state.shape`` in ``dtype`` (``out`` viewed that way when given).
    Raises:
        ValueError: ``packed`` is not uint8, its byte count does not fit ``state.shape``, it
            lives on another device than the state, or ``out`` does not fit.
    """
    check_packed(packed, state)
    dtype = (out.dtype if out is not None else state.dtype) if dtype is None else dtype
    absmax = state.absmax_fp32()  # [nblocks] fp32
    bs, n = state.blocksize, state.numel
    data = packed.reshape(-1)
    if out is None:
        out = (torch.empty(state.shape, dtype=dtype, device=data.device)
               if torch.compiler.is_compiling() else empty_output(state.shape, dtype, data.device))
    elif out.numel() != n or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {dtype} tensor of {n} elements, got "
                         f"{out.dtype} {tuple(out.shape)}")
    dst = out.view(-1)
    if torch.compiler.is_compiling():
        dst.copy_(_dequantize_traceable(data, absmax, state, dtype))
        return out.view(state.shape)
    # One gather per byte: the pair table turns a byte into its two fp32 code values (8 bytes),
    # then one multiply by the block absmax in fp32; a non-fp32 output gets one cast (copy_).
    lut = table("pairs_" + state.quant_type, data.device)  # float64 view [256]
    nbytes, total = data.numel(), state.nblocks * bs // 2  # bytes, padded to whole blocks
    chunk = min(total, _CHUNK_BYTES["cpu" if data.device.type == "cpu" else "other"])
    direct = dtype == torch.float32 and dst.storage_offset() % 2 == 0  # 8-byte aligned pairs
    idx = torch.empty(chunk, dtype=torch.int32, device=data.device)
    buf = None if direct else torch.empty(chunk, dtype=torch.float64, device=data.device)
    for start in range(0, total, chunk):  # chunk is a multiple of bs // 2: whole blocks
        stop = min(start + chunk, total)
        scale = absmax[2 * start // bs:2 * stop // bs].unsqueeze(1)  # [blocks in chunk, 1]
        if direct and 2 * stop <= n:  # gather straight into the output, scale in place
            pairs = dst[2 * start:2 * stop].view(torch.float64)
            torch.index_select(lut, 0, idx[:stop - start].copy_(data[start:stop]), out=pairs)
            pairs.view(torch.float32).view(-1, bs).mul_(scale)
            continue
        if buf is None:
            buf = torch.empty(chunk, dtype=torch.float64, device=data.device)  # fp32 pairs
        have = min(stop, nbytes) - start  # real bytes; the rest pads the last block
        torch.index_select(lut, 0, idx[:have].copy_(data[start:stop]), out=buf[:have])
        if have < stop - start:
            buf[have:stop - start].zero_()
        vals = buf[:stop - start].view(torch.float32)  # [2 * (stop - start)]
        vals.view(-1, bs).mul_(scale)
        m = min(2 * stop, n) - 2 * start
        dst[2 * start:2 * start + m].copy_(vals if m == vals.numel() else vals[:m])  # one rounding
    return out.view(state.shape)


def _dequantize_traceable(data: torch.Tensor, absmax: torch.Tensor, state: NF4State,
                          dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_nf4`` as one straight-line expression (no chunk loop, no storage queries),
    for torch.compile to trace and fuse; same fp32 product and single cast, so the same bits.

    Args:
        data: uint8 [nbytes] packed codes; absmax: fp32 [nblocks].
    Returns:
        flat [numel] tensor in ``dtype``.
    """
    bs, n = state.blocksize, state.numel
    code = table(state.quant_type, data.device)  # fp32 [16]
    nibbles = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:n].long()  # [numel]
    full = n // bs * bs
    # whole blocks as [blocks, bs] * [blocks, 1]; the partial last block on its own (a single
    # flat gather * repeated absmax miscompiles past element 512 in torch 2.13's CPU inductor)
    vals = (code[nibbles[:full]].view(-1, bs) * absmax[:full // bs].unsqueeze(1)).view(-1)
    if full < n:
        vals = torch.cat([vals, code[nibbles[full:]] * absmax[full // bs]])
    return vals.to(dtype)


def bits_per_parameter(blocksize: int = 64, double_quant: bool = False) -> float:
    """Storage cost of one weight: 4 bits + its share of the statistics (asymptotic)."""
    if double_quant:
        return 4.0 + 8.0 / blocksize + 32.0 / (blocksize * NESTED_BLOCKSIZE)
    return 4.0 + 32.0 / blocksize
