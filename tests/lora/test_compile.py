"""torch.compile over NF4Linear: no graph break in our code, and the same bits as eager."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from lora.nf4_linear import NF4Linear

dynamo = pytest.importorskip("torch._dynamo")
if not dynamo.is_dynamo_supported():
    pytest.skip("torch.compile is not supported on this platform", allow_module_level=True)


def _layer(out_f: int, in_f: int, dtype: torch.dtype, double_quant: bool,
           quant_type: str = "nf4") -> NF4Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f).to(dtype)
    return NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant,
                                 quant_type=quant_type)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_forward_has_no_graph_break(double_quant: bool) -> None:
    layer = _layer(64, 64, torch.float32, double_quant)
    x = torch.randn(2, 64, requires_grad=True)  # (batch, in)
    dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = dynamo.explain(layer)(x)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor on CPU needs a C++ compiler")
@pytest.mark.parametrize("dtype,double_quant,quant_type", [
    (torch.float32, True, "nf4"), (torch.bfloat16, False, "fp4")])
def test_compiled_forward_backward_is_bitwise_eager(dtype: torch.dtype, double_quant: bool,
                                                    quant_type: str) -> None:
    # 33 x 40 = 1320 weights: 20 whole blocks of 64 and a partial one of 40
    layer = _layer(33, 40, dtype, double_quant, quant_type)
    x = torch.randn(3, 40, dtype=dtype)
    grad = torch.randn(3, 33, dtype=dtype)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = layer(x_eager)
    y_eager.backward(grad)
    dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_comp = torch.compile(layer, fullgraph=True)(x_comp)
        y_comp.backward(grad)
    assert torch.equal(y_comp, y_eager)
    assert torch.equal(x_comp.grad, x_eager.grad)
