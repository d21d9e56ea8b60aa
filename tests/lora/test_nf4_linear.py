"""NF4Linear: forward/backward against F.linear and bitsandbytes Linear4bit, memory, state dict."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora.nf4 import quantize_nf4
from lora.nf4_linear import NF4Linear
from tests.lora.bits import assert_bits_equal

bnb = pytest.importorskip("bitsandbytes")


def _linear(in_f=128, out_f=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,bias", [(128, True), (96, False), (33, True)])
def test_forward_backward_equal_dense_linear(dtype, in_f, bias):
    lin = _linear(in_f, 40, bias)
    layer = NF4Linear.from_linear(lin, blocksize=64, double_quant=True, compute_dtype=dtype)
    layer.bias is None or layer.bias.requires_grad_(True)  # bias gradient checked too
    x = torch.randn(3, 5, in_f, dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.dequantize(dtype)  # [out, in]
    x2 = x.detach().clone().requires_grad_(True)
    b2 = None if lin.bias is None else lin.bias.detach().to(dtype).requires_grad_(True)
    y2 = F.linear(x2, w, b2)
    y2.backward(g)
    assert_bits_equal(y, y2)
    assert_bits_equal(x.grad, x2.grad)
    if bias:
        assert_bits_equal(layer.bias.grad, b2.grad.float())


def test_compute_dtype_casts_and_returns_input_dtype():
    layer = NF4Linear.from_linear(_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()).float()
    assert_bits_equal(y, expected)


@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes_linear4bit_train_mode(double_quant):
    lin = _linear(128, 64)
    ours = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant,
                                 compute_dtype=torch.float32)
    ref = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=double_quant)
    ref.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False,
                                   quant_type="nf4", compress_statistics=double_quant,
                                   blocksize=64).to("cpu")  # quantizes on the move
    ref.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    ref.train()  # bitsandbytes' eval-mode CPU path repacks the weight into another layout
    assert torch.equal(ours.weight, ref.weight.data.view(torch.uint8))
    x = torch.randn(2, 7, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = ours(x), ref(x_ref)
    assert_bits_equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_bits_equal(x.grad, x_ref.grad)


def test_backward_saves_no_dense_weight():
    """Whatever autograd saves between forward and backward is far smaller than [out, in]."""
    layer = NF4Linear.from_linear(_linear(256, 512), compute_dtype=torch.float32)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert all(t.numel() < 512 * 256 // 4 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()  # and backward still works, re-dequantizing
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(2, 256), atol=1e-5, rtol=1e-5)


def test_dense_linear_control_saves_weight():
    """Control for the hook above: autograd does save the dense weight of an F.linear."""
    w = torch.randn(512, 256, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.linear(torch.randn(2, 256, requires_grad=True), w)
    assert any(t.numel() == 512 * 256 for t in saved)  # (possibly as its transpose)


def test_state_dict_is_bitsandbytes_layout_and_round_trips():
    lin = _linear(128, 40)
    layer = NF4Linear.from_linear(lin, double_quant=True)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map",
                       "weight.nested_absmax", "weight.nested_quant_map",
                       "weight.quant_state.bitsandbytes__nf4"}
    # bitsandbytes rebuilds its own layer from these tensors and computes the same output
    ref = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    ref.weight = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats,
                                                     requires_grad=False, device="cpu", module=ref)
    ref.bias = nn.Parameter(sd["bias"])
    ref.train()
    x = torch.randn(3, 128)
    assert_bits_equal(ref(x), layer(x))
    # and our layer loads bitsandbytes' state dict back
    other = NF4Linear.from_linear(_linear(128, 40, seed=9), double_quant=False)
    other.load_state_dict(ref.state_dict())
    assert torch.equal(other.weight, layer.weight)
    assert_bits_equal(other(x), layer(x))


def test_dtype_casts_leave_quant_state_alone():
    layer = NF4Linear.from_linear(_linear(), double_quant=False)
    absmax = layer.state.absmax.clone()
    layer.half()
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.float16
    assert torch.equal(layer.state.absmax, absmax)


def test_to_linear_and_rejects_non_2d():
    lin = _linear(64, 32)
    layer = NF4Linear.from_linear(lin)
    dense = layer.to_linear(torch.bfloat16)
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.bfloat16
    assert_bits_equal(dense.weight, layer.dequantize(torch.bfloat16))
    packed, state = quantize_nf4(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(packed, state)
