"""The 4-bit and 8-bit codebooks of QLoRA, and the constant lookup tables built from them.

This is the one place where code values live: bitsandbytes' NF4 and FP4 4-bit codebooks, its
signed 8-bit "dynamic" codebook (used by double quantization), and the tables derived from them
(a byte -> (high code, low code) pair table for dequantization, bitsandbytes-CPU's 65,536-bin
rounding table for the 8-bit step).
"""
from __future__ import annotations

import functools

import torch

__all__ = ["NF4_VALUES", "QUANT_TYPES", "codebook", "dynamic_map_8bit", "warm_tables",
           "check_quant_type"]

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
LUT_BINS = 65536  # bitsandbytes-CPU's 8-bit quantizer table size


def check_quant_type(quant_type: str) -> None:
    """Raise ``ValueError`` unless ``quant_type`` is one of ``QUANT_TYPES``."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}: expected one of {QUANT_TYPES}")


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    mags = torch.tensor(_FP4_TIMES_12, dtype=torch.float32)
    # code 8 is +0.0 as in bitsandbytes' table (negating mags[0] would give -0.0)
    return torch.cat([mags, torch.zeros(1), -mags[1:]]) / 12.0


def codebook(quant_type: str = "nf4", device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 values that the 4-bit codes 0..15 stand for.

    Args:
        quant_type: "nf4" or "fp4".
        device: where the returned tensor lives.
    Returns:
        fp32 tensor [16] (a fresh copy the caller may modify).
    """
    check_quant_type(quant_type)
    return table(quant_type, torch.device(device)).clone()


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


def midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 midpoints between sorted code values [len - 1] and the sorted-position -> code map."""
    order = torch.argsort(code, stable=True)
    s = code[order]
    return (s[:-1] + s[1:]) / 2, order


@functools.lru_cache(maxsize=None)
def _pair_lut_cpu(quant_type: str) -> torch.Tensor:
    """byte -> (code[high nibble], code[low nibble]) as one 8-byte element: float64 view [256]."""
    code = _code_cpu(quant_type)
    b = torch.arange(256)
    pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()  # [256, 2] fp32
    return pairs.view(torch.float64).view(256)


@functools.lru_cache(maxsize=None)
def _lut_8bit_cpu() -> torch.Tensor:
    """bitsandbytes-CPU's table: bin i (centre -1 + 2i/65535) -> number of code midpoints below."""
    mids, _ = midpoints(dynamic_map_8bit())
    i = torch.arange(LUT_BINS, dtype=torch.float32)
    centres = -1.0 + (2.0 * i) / float(LUT_BINS - 1)
    return torch.bucketize(centres, mids, right=False).to(torch.uint8)


# Constant lookup tables per (name, device), built eagerly once: a compiled forward then reads
# them as graph constants instead of rebuilding them (or copying them to the device) per call.
_TABLE_BUILDERS = {
    "nf4": lambda: _code_cpu("nf4"),
    "fp4": lambda: _code_cpu("fp4"),
    "dynamic8": dynamic_map_8bit,
    "lut8": _lut_8bit_cpu,
    "pairs_nf4": lambda: _pair_lut_cpu("nf4"),
    "pairs_fp4": lambda: _pair_lut_cpu("fp4"),
}
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def table(name: str, device: torch.device | str) -> torch.Tensor:
    """The constant table ``name`` (a key of ``_TABLE_BUILDERS``) on ``device``; do not modify."""
    key = (name, torch.device(device))
    found = _TABLES.get(key)
    if found is None:
        found = _TABLE_BUILDERS[name]().to(key[1])
        if not torch.compiler.is_compiling():  # a traced tensor must not outlive its graph
            _TABLES[key] = found
    return found


def warm_tables(quant_type: str, device: torch.device | str) -> None:
    """Build the tables that dequantizing a ``quant_type`` weight on ``device`` reads.

    Called eagerly (e.g. when a layer is built or moved) so that a later ``torch.compile`` finds
    them cached.
    """
    if torch.compiler.is_compiling() or torch.device(device).type == "meta":
        return
    for name in (quant_type, "dynamic8", "pairs_" + quant_type):
        table(name, torch.device(device))
