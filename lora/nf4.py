"""4-bit NormalFloat (NF4) and FP4 blockwise quantization, bit-exact with bitsandbytes.

A weight is flattened row-major and cut into blocks of ``blocksize`` consecutive elements (the
last one may be partial). Per block: fp32 absmax, scale by its reciprocal, pick the nearest of
16 codebook values by comparing with the fp32 midpoints (a tie goes to the lower code), and pack
two 4-bit codes per byte, the first element in the high nibble.

Double quantization stores the fp32 absmax vector itself in 8 bits: subtract its mean, quantize
blocks of 256 with the signed 8-bit "dynamic" codebook, keep one fp32 absmax per 256 blocks.
bitsandbytes rounds that 8-bit step differently on CPU (a 65,536-bin lookup table) and on CUDA
(exact nearest); ``rounding=`` picks either, ``"auto"`` follows the tensor's device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

# bitsandbytes' NF4 codebook (fp32, sorted): quantiles of N(0, 1) scaled to [-1, 1], exact zero.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (E2M1, bias 2) magnitudes x12 for codes 0..7; codes 8..15 add the sign bit.
_FP4_TIMES_12 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # blocks of first-level absmax values per nested fp32 absmax
ROUNDINGS = ("auto", "cpu", "cuda")
_LUT_BINS = 65536  # bitsandbytes-CPU's 8-bit quantizer table size
_CHUNK_BYTES = 1 << 16  # packed bytes per dequantization chunk (output chunk stays in L2)


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        mags = torch.tensor(_FP4_TIMES_12, dtype=torch.float32)
        # +0.0 at code 8, like bitsandbytes' Python table (x * -1 would give -0.0)
        return torch.cat([mags, -mags[1:].new_zeros(1), -mags[1:]]) / 12.0
    raise ValueError(f"quant_type={quant_type!r}: expected one of {QUANT_TYPES}")


def codebook(quant_type: str = "nf4", device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 values that the 4-bit codes 0..15 stand for.

    Args:
        quant_type: "nf4" or "fp4".
        device: where the returned tensor lives.
    Returns:
        fp32 tensor [16].
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}: expected one of {QUANT_TYPES}")
    return _table(quant_type, torch.device(device)).clone()  # callers may modify their copy


@functools.lru_cache(maxsize=None)
def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic-exponent codebook (256 sorted fp32 values in [-1, 1]).

    For exponent e = 0..6 the magnitudes are 10**(e-6) times the midpoints of a (2**e + 1)-point
    fp32 grid on [0.1, 1] (product rounded to fp32), with both signs; plus 0 and 1.
    """
    parts = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for e in range(7):
        grid = torch.linspace(0.1, 1.0, 2 ** e + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0 * (10.0 ** (e - 6))  # fp32 tensor * scalar: fp32
        parts += [mids, -mids]
    return torch.sort(torch.cat(parts)).values  # tensor ops only: traceable by torch.compile


# Constant lookup tables per (name, device), built eagerly once: a compiled forward then reads
# them as graph constants instead of rebuilding them (or copying them to the device) per call.
_TABLE_BUILDERS = {
    "nf4": lambda: _code_cpu("nf4"),
    "fp4": lambda: _code_cpu("fp4"),
    "dynamic8": lambda: dynamic_map_8bit(),
    "pairs_nf4": lambda: _pair_lut_cpu("nf4"),
    "pairs_fp4": lambda: _pair_lut_cpu("fp4"),
}
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """The constant table ``name`` on ``device`` (kept after the first eager build)."""
    key = (name, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        table = _TABLE_BUILDERS[name]().to(key[1])
        if not torch.compiler.is_compiling():  # a traced tensor must not outlive its graph
            _TABLES[key] = table
    return table


def warm_tables(quant_type: str, device: torch.device | str) -> None:
    """Build the tables that dequantizing a ``quant_type`` weight on ``device`` reads.

    Called eagerly (e.g. when a layer is built or moved) so that a later ``torch.compile`` finds
    them cached.
    """
    if torch.compiler.is_compiling():
        return
    for name in (quant_type, "dynamic8", "pairs_" + quant_type):
        _table(name, torch.device(device))


def _midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 midpoints between sorted code values and the sorted-position -> code map."""
    order = torch.argsort(code, stable=True)
    s = code[order]
    return (s[:-1] + s[1:]) / 2, order


@functools.lru_cache(maxsize=None)
def _lut_8bit_cpu() -> torch.Tensor:
    """bitsandbytes-CPU's table: bin i (centre -1 + 2i/65535) -> number of code midpoints below."""
    mids, _ = _midpoints(dynamic_map_8bit())
    i = torch.arange(_LUT_BINS, dtype=torch.float32)
    centres = -1.0 + (2.0 * i) / float(_LUT_BINS - 1)
    return torch.bucketize(centres, mids, right=False).to(torch.uint8)


@dataclasses.dataclass(frozen=True)
class NF4State:
    """Everything besides the packed bytes that dequantization needs (bitsandbytes' QuantState).

    Tensors live on the device of the packed weight; ``to(device)`` moves them together.
    """
    absmax: torch.Tensor  # fp32 [nblocks]; uint8 [nblocks] 8-bit codes when double-quantized
    shape: torch.Size  # original weight shape, e.g. [out, in]
    dtype: torch.dtype  # original weight dtype (the default dequantization dtype)
    blocksize: int = 64  # elements per first-level block
    quant_type: str = "nf4"  # "nf4" or "fp4"
    offset: Optional[torch.Tensor] = None  # 0-d fp32 mean of the absmax vector (double quant)
    nested_absmax: Optional[torch.Tensor] = None  # fp32 [ceil(nblocks/256)] (double quant)

    def __post_init__(self) -> None:
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize}: expected one of {BLOCKSIZES}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r}: expected one of {QUANT_TYPES}")
        if (self.offset is None) != (self.nested_absmax is None):
            raise ValueError("offset and nested_absmax must be given together (double quant)")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

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


def _check_rounding(rounding: str, device: torch.device) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: expected one of {ROUNDINGS}")
    if rounding == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    return rounding


def quantize_blockwise_8bit(x: torch.Tensor, rounding: str = "auto",
                            blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic codebook (the double-quant step).

    Args:
        x: fp32 tensor [n] (the mean-centred absmax vector).
        rounding: "cpu" (bitsandbytes-CPU lookup table), "cuda" (exact nearest) or "auto".
        blocksize: elements per block (bitsandbytes uses 256).
    Returns:
        (codes uint8 [n], absmax fp32 [ceil(n / blocksize)]).
    """
    rounding = _check_rounding(rounding, x.device)
    n = x.numel()
    nblocks = -(-n // blocksize)
    flat = torch.nn.functional.pad(x.reshape(-1).float(), (0, nblocks * blocksize - n))
    blocks = flat.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # [nblocks]
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1.0, 1.0)
    if rounding == "cuda":
        mids, _ = _midpoints(dynamic_map_8bit().to(x.device))
        codes = torch.bucketize(scaled, mids, right=False).to(torch.uint8)
    else:
        # bin = trunc((s + 1) * 0.5 * 65535 + 0.5) in fp32, then the table; empty blocks -> code 0
        bins = ((scaled + 1.0) * 0.5 * float(_LUT_BINS - 1) + 0.5).to(torch.int64)
        codes = _lut_8bit_cpu().to(x.device)[bins]
        codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_8bit``: fp32 [n] = dyn[codes] * absmax[i // blocksize]."""
    n = codes.numel()
    values = _table("dynamic8", codes.device)[codes.reshape(-1).long()]
    nblocks = absmax.numel()
    if nblocks * blocksize != n:
        values = torch.nn.functional.pad(values, (0, nblocks * blocksize - n))
    return (values.view(nblocks, blocksize) * absmax.unsqueeze(1)).view(-1)[:n]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 quant_type: str = "nf4", rounding: str = "auto",
                 ) -> tuple[torch.Tensor, NF4State]:
    """Blockwise 4-bit quantization (bitsandbytes ``quantize_4bit``).

    Args:
        weight: fp32/bf16/fp16 tensor of any shape (flattened row-major).
        blocksize: one of ``BLOCKSIZES``.
        double_quant: also quantize the absmax vector to 8 bits (``compress_statistics``).
        quant_type: "nf4" or "fp4".
        rounding: "cpu" copies bitsandbytes-CPU (lookup-table double quant, division in the
            last partial block); "cuda" copies the CUDA kernel (exact nearest, reciprocal);
            "auto" picks by ``weight.device``.
    Returns:
        (packed uint8 [(numel + 1) // 2, 1], NF4State).
    """
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"weight dtype {weight.dtype}: expected float32, bfloat16 or float16")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize}: expected one of {BLOCKSIZES}")
    rounding = _check_rounding(rounding, weight.device)
    code = codebook(quant_type, weight.device)
    mids, order = _midpoints(code)
    flat = weight.detach().reshape(-1)  # [n] in the input dtype
    n = flat.numel()
    nblocks = -(-n // blocksize)
    full = (n // blocksize) * blocksize
    absmax = torch.empty(nblocks, dtype=torch.float32, device=weight.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    # chunks of whole blocks keep the fp32 temporaries small and in cache: [rows, blocksize]
    step = max(1, (1 << 18) // blocksize) * blocksize if weight.device.type == "cpu" else max(n, 1)
    for start in range(0, n, step):
        stop = min(start + step, n)
        codes = _quantize_span(flat[start:stop], blocksize, mids, absmax[start // blocksize:],
                               rounding)
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
                   rounding: str) -> torch.Tensor:
    """Codes (uint8 [len(x)]) of a span starting on a block boundary; writes its absmax values.

    "cpu" follows bitsandbytes' CPU path: absmax clamped to >= 1e-38 before the reciprocal (the
    partial last block stores the clamped value and divides). "cuda" follows the CUDA kernel:
    a plain reciprocal, so an all-zero block gives 0 * inf = NaN, which its decision tree sends
    to code 0.
    """
    m = x.numel()
    nfull = m // blocksize
    xf = x.float()
    parts = []
    if nfull:
        blocks = xf[: nfull * blocksize].view(nfull, blocksize)
        amax = blocks.abs().amax(dim=1)  # [nfull]
        absmax_out[:nfull] = amax
        recip = 1.0 / (amax.clamp(min=1e-38) if rounding == "cpu" else amax)
        parts.append(_codes(blocks * recip.unsqueeze(1), mids, rounding))
    if m > nfull * blocksize:
        tail = xf[nfull * blocksize:]
        amax = tail.abs().amax()
        if rounding == "cpu":
            amax = amax.clamp(min=1e-38)
            scaled = tail / amax
        else:
            scaled = tail * (1.0 / amax)
        absmax_out[nfull] = amax
        parts.append(_codes(scaled, mids, rounding))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _codes(scaled: torch.Tensor, mids: torch.Tensor, rounding: str) -> torch.Tensor:
    """Nearest code by the fp32 midpoints (ties to the lower code). NaN: code 0 on "cuda" (its
    decision tree), the last code on "cpu" (bucketize, like bitsandbytes' CPU path)."""
    scaled = scaled.clamp_(-1.0, 1.0).reshape(-1)
    if rounding == "cuda":
        scaled = torch.nan_to_num(scaled, nan=-1.0)
    return torch.bucketize(scaled, mids, right=False).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _pair_lut_cpu(quant_type: str) -> torch.Tensor:
    """byte -> (code[high nibble], code[low nibble]) as one 8-byte element: float64 view [256]."""
    code = _code_cpu(quant_type)
    b = torch.arange(256)
    pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()  # [256, 2] fp32
    return pairs.view(torch.float64).view(256)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of ``quantize_nf4``: code value (fp32) * absmax (fp32), one cast to ``dtype``.

    Args:
        packed: uint8 [(numel + 1) // 2, 1] (any shape/1-byte view of those bytes).
        state: the quantization state.
        dtype: output dtype; defaults to ``out``'s dtype, else the original weight dtype.
        out: optional contiguous tensor of ``state.numel`` elements to write into (reusing a
            buffer saves the page faults of a fresh allocation).
    Returns:
        Tensor of ``state.shape`` in ``dtype`` (``out`` viewed that way when given).
    """
    dtype = (out.dtype if out is not None else state.dtype) if dtype is None else dtype
    absmax = state.absmax_fp32()  # [nblocks] fp32
    bs, n = state.blocksize, state.numel
    data = packed.reshape(-1).view(torch.uint8)
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=data.device)
    elif out.numel() != n or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {dtype} tensor of {n} elements, got "
                         f"{out.dtype} {tuple(out.shape)}")
    dst = out.view(-1)
    if torch.compiler.is_compiling():
        dst.copy_(_dequantize_traceable(data, absmax, state, dtype))
        return out.view(state.shape)
    # fp32 output can take the gathered code pairs directly (needs 8-byte alignment)
    direct = dtype == torch.float32 and dst.storage_offset() % 2 == 0
    lut = _table("pairs_" + state.quant_type, data.device)
    nbytes, total = data.numel(), absmax.numel() * bs // 2  # bytes, padded to whole blocks
    # CPU: L2-sized chunks; CUDA: one pass (kernel launches, not caches, are the cost there)
    chunk = total if data.device.type != "cpu" or total <= _CHUNK_BYTES else _CHUNK_BYTES
    idx = torch.empty(chunk, dtype=torch.int32, device=data.device)
    buf = torch.empty(chunk, dtype=torch.float64, device=data.device)  # pairs of fp32 codes
    for start in range(0, total, chunk):  # chunk is a multiple of bs // 2: whole blocks
        stop = min(start + chunk, total)
        have = max(0, min(stop, nbytes) - start)
        scale = absmax[2 * start // bs:2 * stop // bs].unsqueeze(1)  # [blocks in chunk, 1]
        if direct and 2 * stop <= n:  # gather straight into the output
            pairs = dst[2 * start:2 * stop].view(torch.float64)
            torch.index_select(lut, 0, idx[:have].copy_(data[start:stop]), out=pairs)
            pairs.view(torch.float32).view(-1, bs).mul_(scale)
            continue
        torch.index_select(lut, 0, idx[:have].copy_(data[start:start + have]), out=buf[:have])
        if have < stop - start:
            buf[have:stop - start].zero_()  # padding of the last block
        vals = buf[:stop - start].view(torch.float32).view(-1, bs)  # [blocks in chunk, bs]
        if 2 * stop <= n:
            torch.mul(vals, scale, out=dst[2 * start:2 * stop].view(-1, bs))
        else:  # the chunk holding the partial last block
            dst[2 * start:] = (vals * scale).view(-1)[:n - 2 * start]
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
    code = _table(state.quant_type, data.device)  # fp32 [16]
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
