"""lora.nf4 against bitsandbytes' CPU quantize_4bit / dequantization, built in the same test."""
from __future__ import annotations

import math
import random

import pytest
import torch

from lora.nf4 import (BLOCKSIZES, NF4State, bits_per_parameter, codebook, dequantize_nf4,
                      dynamic_map_8bit, quantize_blockwise_8bit, quantize_nf4)

from tests.lora.bits import assert_bits_equal  # noqa: E402

bnbF = pytest.importorskip("bitsandbytes.functional")

# shapes: numel divisible by every blocksize, rows shorter than a block, odd numel, 1-D, 3-D
SHAPES = [(128, 64), (64, 96), (33, 7), (5,), (1, 1), (4, 8, 40), (257, 300)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_rng = random.Random(0)
# every (shape, dtype) pair with two blocksizes sampled from 32..4096 (seeded, so stable)
CASES = [(s, d, bs) for s in SHAPES for d in DTYPES for bs in _rng.sample(BLOCKSIZES, 2)]


def _weight(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2.5).to(dtype)


def _bnb_reference_dequant(packed, st, quant_type, dtype):
    """bitsandbytes' pure-torch 4-bit dequantization (its CPU AVX-512 kernel is wrong when the
    last dimension is not a multiple of the blocksize, so it is not used as the oracle)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    absmax = st.absmax
    if st.nested:  # bitsandbytes' own double-quant dequantization (CPU kernel)
        absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # eager, not compiled
    return fn(packed.reshape(-1), absmax, _get_4bit_code(quant_type, packed.device),
              st.blocksize, st.shape, dtype)


def test_codebooks_match_bitsandbytes():
    assert_bits_equal(codebook("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))
    assert_bits_equal(codebook("fp4"), bnbF.get_4bit_type("fp4", device="cpu"))
    assert_bits_equal(dynamic_map_8bit(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape,dtype,blocksize", CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}-bs{b}" for s, d, b in CASES])
def test_quantize_bit_exact(shape, dtype, blocksize, double_quant):
    w = _weight(shape, dtype)
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                         compress_statistics=double_quant)
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref.absmax)  # fp32, or uint8 codes with double quant
    if double_quant:
        assert torch.equal(state.offset, ref.offset)
        assert torch.equal(state.nested_absmax, ref.state2.absmax)
    for out_dtype in DTYPES:
        expected = _bnb_reference_dequant(ref_packed, ref, "nf4", out_dtype)
        got = dequantize_nf4(packed, state, out_dtype)
        assert got.shape == w.shape and got.dtype == out_dtype
        assert_bits_equal(got.reshape(-1), expected.reshape(-1))


@pytest.mark.parametrize("shape", [(64, 128), (256, 512)])
def test_dequantize_matches_bitsandbytes_cpu_kernel(shape):
    """Where its AVX-512 kernel is right (last dim a multiple of the blocksize), compare to it."""
    w = _weight(shape, torch.float32, seed=3)
    for dq in (False, True):
        ref_packed, ref = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                             compress_statistics=dq)
        packed, state = quantize_nf4(w, blocksize=64, double_quant=dq)
        for dtype in DTYPES:
            assert_bits_equal(dequantize_nf4(packed, state, dtype),
                                       bnbF.dequantize_4bit(ref_packed, ref, quant_type="nf4").to(dtype)
                                       if dtype == torch.float32 else
                                       _bnb_reference_dequant(ref_packed, ref, "nf4", dtype))


@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((33, 7), 32), ((300,), 128)])
def test_fp4_bit_exact(shape, blocksize):
    w = _weight(shape, torch.float32, seed=1)
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="fp4")
    packed, state = quantize_nf4(w, blocksize=blocksize, quant_type="fp4")
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    assert_bits_equal(dequantize_nf4(packed, state),
                               _bnb_reference_dequant(ref_packed, ref, "fp4", torch.float32))


def test_double_quant_cpu_lookup_table_rounding():
    """bitsandbytes-CPU's 8-bit step uses a lookup table; 'cpu' rounding must match it exactly,
    'cuda' rounding (exact nearest) must differ from it somewhere on enough values."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256 * 300, generator=gen) * torch.rand(256 * 300, generator=gen)
    ref_codes, ref_state = bnbF.quantize_blockwise(x, blocksize=256)
    codes, absmax = quantize_blockwise_8bit(x, rounding="cpu")
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)
    nearest, _ = quantize_blockwise_8bit(x, rounding="cuda")
    differ = int((nearest != ref_codes).sum())
    assert 0 < differ < x.numel() // 100  # rare disagreements...
    dyn = dynamic_map_8bit()
    scaled = (x.view(300, 256) / absmax.unsqueeze(1)).reshape(-1)
    lut_err = (dyn[ref_codes.long()] - scaled).abs()
    near_err = (dyn[nearest.long()] - scaled).abs()
    assert bool((near_err <= lut_err).all())  # exact nearest is never worse...
    assert float((lut_err - near_err).max()) <= 2.0 / 65535  # ...and the table is off by < a bin


def test_nearest_rounding_is_exact_nearest():
    """'cuda' rounding picks the codebook value nearest to the scaled input (ties: lower code)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(256 * 16, generator=gen) * 2 - 1
    codes, absmax = quantize_blockwise_8bit(x, rounding="cuda")
    scaled = x.view(16, 256) * (1.0 / absmax).unsqueeze(1)
    dist = (scaled.reshape(-1, 1) - dynamic_map_8bit().unsqueeze(0)).abs()  # [n, 256]
    best = dist.min(dim=1).values
    chosen = dist.gather(1, codes.long().unsqueeze(1)).squeeze(1)
    assert_bits_equal(chosen, best)


def test_reference_numbers_and_error_bound():
    """Independent fixed facts: bytes of the seed-0 (128, 64) case, error <= absmax * half gap."""
    torch.manual_seed(0)
    w = torch.randn(128, 64)
    packed, state = quantize_nf4(w, blocksize=64)
    assert packed[:16, 0].tolist() == [68, 102, 169, 97, 131, 136, 123, 182,
                                       50, 154, 147, 109, 165, 104, 204, 164]
    err = (dequantize_nf4(packed, state) - w).abs().view(-1, 64)
    max_gap = (codebook()[1:] - codebook()[:-1]).max()
    assert bool((err <= state.absmax.unsqueeze(1) * max_gap / 2 + 1e-6).all())


def test_all_zero_and_partial_blocks_round_trip_shape():
    w = torch.zeros(3, 70)
    w[2, 5:] = torch.linspace(-1, 1, 65)
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    packed, state = quantize_nf4(w, blocksize=64)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    assert dequantize_nf4(packed, state).shape == (3, 70)
    assert torch.equal(dequantize_nf4(packed, state)[0], torch.zeros(70))


def test_bits_per_parameter():
    assert bits_per_parameter(64, False) == 4.5
    assert math.isclose(bits_per_parameter(64, True), 4.127, abs_tol=5e-4)


def test_bad_arguments_rejected():
    with pytest.raises(ValueError, match="blocksize=48"):
        quantize_nf4(torch.randn(4, 4), blocksize=48)
    with pytest.raises(ValueError, match="dtype"):
        quantize_nf4(torch.randn(4, 4).double())
    with pytest.raises(ValueError, match="quant_type"):
        quantize_nf4(torch.randn(4, 4), quant_type="int4")
    with pytest.raises(ValueError, match="rounding"):
        quantize_nf4(torch.randn(4, 4), rounding="gpu")
    with pytest.raises(ValueError, match="blocksize=7"):
        NF4State(absmax=torch.ones(1), shape=torch.Size([4]), dtype=torch.float32, blocksize=7)


@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((33, 7), 32), ((300, 700), 256)])
def test_dequantize_into_out_buffer(shape, blocksize):
    w = _weight(shape, torch.float32, seed=2)
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                         compress_statistics=True)
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=True)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full(shape, float("nan"), dtype=dtype)
        got = dequantize_nf4(packed, state, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert_bits_equal(got, _bnb_reference_dequant(ref_packed, ref, "nf4", dtype))
    with pytest.raises(ValueError, match="out"):
        dequantize_nf4(packed, state, out=torch.empty(3))


def test_all_zero_block_cpu_vs_cuda_rounding():
    """bitsandbytes-CPU packs an all-zero block as code 7 (0.0); its CUDA kernel computes
    0 * (1/0) = NaN and its decision tree picks code 0; both dequantize to zeros."""
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    ref_packed, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    cpu_packed, cpu_state = quantize_nf4(w, 64, rounding="cpu")
    assert torch.equal(cpu_packed, ref_packed) and int(cpu_packed[0]) == 0x77
    cuda_packed, cuda_state = quantize_nf4(w, 64, rounding="cuda")
    assert bool((cuda_packed[:32] == 0).all()) and torch.equal(cuda_packed[32:], ref_packed[32:])
    for packed, state in ((cpu_packed, cpu_state), (cuda_packed, cuda_state)):
        assert torch.equal(dequantize_nf4(packed, state)[0].abs(), torch.zeros(64))


def test_dequantize_into_unaligned_out_slice():
    w = _weight((64, 64), torch.float32, seed=4)
    packed, state = quantize_nf4(w)
    storage = torch.empty(64 * 64 + 1)
    got = dequantize_nf4(packed, state, out=storage[1:])  # fp32 offset 1: not 8-byte aligned
    assert_bits_equal(got, dequantize_nf4(packed, state))
