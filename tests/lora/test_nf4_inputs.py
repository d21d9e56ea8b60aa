"""NF4 bad inputs are refused with errors naming the mismatch; exactness compared bit for bit."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lora.nf4 import NF4State, dequantize_nf4, quantize_nf4
from lora.nf4_codes import codebook
from lora.nf4_double import dequantize_blockwise_8bit, quantize_blockwise_8bit
from lora.nf4_linear import NF4Linear
from tests.lora.bits import assert_bits_equal, bits

bnbF = pytest.importorskip("bitsandbytes.functional")


def _weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_fp4_code_8_is_positive_zero_like_bitsandbytes():
    ours, ref = codebook("fp4"), bnbF.get_4bit_type("fp4", device="cpu")
    assert_bits_equal(ours, ref)
    assert not torch.signbit(ours[8])
    assert_bits_equal(codebook("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((96, 130), 64), ((33, 7), 32), ((7,), 64)])
def test_dequantize_bits_equal_bitsandbytes(quant_type, dtype, shape, blocksize):
    """Zeros in the weight (exact and all-zero blocks) make signed zeros appear in the output."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    w = _weight(shape)
    w.view(-1)[:blocksize] = 0.0  # an all-zero block
    w.view(-1)[blocksize::5] = 0.0
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    packed, state = quantize_nf4(w, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(packed, ref_packed) and torch.equal(bits(state.absmax), bits(ref.absmax))
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    expected = fn(ref_packed.reshape(-1), ref.absmax, bnbF.get_4bit_type(quant_type, device="cpu"),
                  blocksize, ref.shape, dtype)
    got = dequantize_nf4(packed, state, dtype)
    assert_bits_equal(got, expected)
    out = torch.full(shape, float("nan"), dtype=dtype)
    assert_bits_equal(dequantize_nf4(packed, state, out=out), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_dequantize_bits_equal_bitsandbytes_kernel(dtype):
    """Many dequantization chunks into a fresh >= 4 MiB output (the huge-page advised path of
    lora/nf4_alloc.py), against bnb's CPU kernel."""
    import copy
    w = _weight((2048, 1024), seed=3)
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                         compress_statistics=True)
    packed, state = quantize_nf4(w, 64, double_quant=True)
    ref = copy.copy(ref)
    ref.dtype = dtype
    assert_bits_equal(dequantize_nf4(packed, state, dtype),
                      bnbF.dequantize_4bit(ref_packed, ref, quant_type="nf4"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("double_quant", [False, True])
def test_non_finite_weight_refused_at_quantization(bad, double_quant):
    w = _weight((8, 64))
    w[3, 5] = bad
    with pytest.raises(ValueError, match=r"non-finite value \((nan|inf|-inf) at flat index 197\)"):
        quantize_nf4(w, 64, double_quant=double_quant)
    with pytest.raises(ValueError, match="non-finite"):
        NF4Linear.from_linear(_lin(w))
    tail = _weight((70,))  # the partial last block is checked as well
    tail[-1] = bad
    with pytest.raises(ValueError, match="flat index 69"):
        quantize_nf4(tail, 64, double_quant=double_quant)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_blockwise_8bit(torch.tensor([0.5, bad]))


def _lin(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    return lin


def test_empty_tensors_refused():
    with pytest.raises(ValueError, match=r"shape \(0, 64\) is empty"):
        quantize_nf4(torch.empty(0, 64))
    with pytest.raises(ValueError, match="is empty"):
        NF4State(absmax=torch.empty(0), shape=torch.Size([0]), dtype=torch.float32)
    with pytest.raises(ValueError, match="x is empty"):
        quantize_blockwise_8bit(torch.empty(0))


def test_dequantize_refuses_non_uint8_packed():
    packed, state = quantize_nf4(_weight((4, 64)))
    for wrong in (packed.float(), packed.to(torch.int8), packed.to(torch.int32)):
        with pytest.raises(ValueError, match=f"dtype {wrong.dtype}; expected torch.uint8"):
            dequantize_nf4(wrong, state)
    with pytest.raises(ValueError, match="expected torch.uint8"):
        NF4Linear(packed.float(), state)


def test_dequantize_refuses_wrong_byte_count():
    packed, state = quantize_nf4(_weight((4, 64)))  # 256 weights -> 128 bytes
    with pytest.raises(ValueError, match=r"packed holds 127 bytes; shape \(4, 64\) \(256 weights\) "
                                         r"needs 128"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(ValueError, match="packed holds 129 bytes"):
        dequantize_nf4(torch.cat([packed, packed[:1]]), state)
    with pytest.raises(ValueError, match="packed holds 127 bytes"):
        NF4Linear(packed[:-1], state)


def test_state_refuses_short_or_long_absmax():
    w = _weight((4, 100))  # 400 weights in blocks of 64 -> 7 blocks
    _, state = quantize_nf4(w, 64)
    for absmax in (state.absmax[:-1], torch.cat([state.absmax, state.absmax[:1]])):
        with pytest.raises(ValueError, match=rf"absmax: {absmax.numel()} torch.float32 values; "
                                             r"shape \(4, 100\) in blocks of 64 needs 7"):
            dataclasses.replace(state, absmax=absmax)
    with pytest.raises(ValueError, match="needs 7 torch.float32"):
        dataclasses.replace(state, absmax=state.absmax.half())
    _, dq = quantize_nf4(w, 64, double_quant=True)
    with pytest.raises(ValueError, match="needs 7 torch.uint8"):
        dataclasses.replace(dq, absmax=dq.absmax[:6])
    with pytest.raises(ValueError, match="nested_absmax: 2 torch.float32 values; expected 1"):
        dataclasses.replace(dq, nested_absmax=torch.ones(2))
    with pytest.raises(ValueError, match="one per block"):
        dequantize_blockwise_8bit(dq.absmax, torch.ones(3))
    with pytest.raises(ValueError, match="expected torch.uint8"):
        dequantize_blockwise_8bit(dq.absmax.float(), dq.nested_absmax)


def test_loading_a_mismatched_state_dict_is_refused():
    layer = NF4Linear.from_linear(_lin(_weight((8, 64))), double_quant=False)
    sd = layer.state_dict()
    sd["weight"] = sd["weight"][:-3]
    fresh = NF4Linear.from_linear(_lin(_weight((8, 64), seed=1)), double_quant=False)
    with pytest.raises(ValueError, match="packed holds 253 bytes"):
        fresh.load_state_dict(sd)


def test_packed_weight_is_a_frozen_uint8_parameter():
    layer = NF4Linear.from_linear(_lin(_weight((8, 64))))
    params = dict(layer.named_parameters())
    assert isinstance(params["weight"], torch.nn.Parameter)
    assert params["weight"].dtype == torch.uint8 and not params["weight"].requires_grad
    assert "weight" not in dict(layer.named_buffers())
    layer.load_state_dict(NF4Linear.from_linear(_lin(_weight((8, 64), seed=2))).state_dict())
    assert isinstance(layer.weight, torch.nn.Parameter) and not layer.weight.requires_grad


def test_huge_page_output_is_an_ordinary_tensor():
    import sys
    from lora import nf4_alloc
    if sys.platform.startswith("linux"):
        assert nf4_alloc._madvise() is not None  # the advice is really given here
    out = nf4_alloc.empty_output(torch.Size([1024, 2048]), torch.float32, torch.device("cpu"))
    assert out.shape == (1024, 2048) and out.dtype == torch.float32 and out.is_contiguous()
    out.fill_(1.5)
    assert float(out.sum()) == 1.5 * 1024 * 2048
