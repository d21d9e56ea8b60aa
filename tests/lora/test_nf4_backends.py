"""NF4Linear backends read the same storage: bitsandbytes' kernel and torch.compile give our bits."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from lora.nf4_linear import NF4Linear
from tests.lora.bits import assert_bits_equal

pytest.importorskip("bitsandbytes")


def _layer(out_f: int, in_f: int, backend: str, double_quant: bool = True) -> NF4Linear:
    torch.manual_seed(0)
    return NF4Linear.from_linear(torch.nn.Linear(in_f, out_f), 64, double_quant, backend=backend)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_backend_gives_the_default_bits(double_quant):
    ours, bnb = _layer(48, 128, "torch", double_quant), _layer(48, 128, "bnb", double_quant)
    assert torch.equal(ours.weight, bnb.weight)  # the same storage
    for dtype in (torch.float32, torch.bfloat16):
        assert_bits_equal(bnb.dequantize(dtype), ours.dequantize(dtype))
    x = torch.randn(3, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ours(x).sum().backward()
    bnb(x2).sum().backward()
    assert_bits_equal(x2.grad, x.grad)


def test_backend_is_switchable_and_checked():
    layer = _layer(8, 64, "torch")
    w = layer.dequantize()
    layer.backend = "bnb"
    assert_bits_equal(layer.dequantize(), w)
    with pytest.raises(ValueError, match="backend='gpu'"):
        _layer(8, 64, "gpu")
    with pytest.raises(ValueError, match=r"last dimension \(40\) must be a multiple"):
        _layer(8, 40, "bnb").dequantize()


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_compile_backend_gives_the_default_bits():
    ours, comp = _layer(33, 40, "torch"), _layer(33, 40, "compile")  # a partial last block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in (torch.float32, torch.bfloat16):
            assert_bits_equal(comp.dequantize(dtype), ours.dequantize(dtype))
