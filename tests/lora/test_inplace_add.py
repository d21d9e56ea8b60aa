"""LoRALinear adds the LoRA term into the base output in place, where that is bitwise the same."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora import LoRAConfig, add_lora


def _pair(dtype: torch.dtype, autocast: bool = False):
    """(ours, peft) over the same two-layer MLP, adapters seeded alike, B made non-zero."""
    from peft import LoraConfig, get_peft_model

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)).to(dtype)

    ours, ref = make(), make()
    torch.manual_seed(3)
    add_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"]))
    torch.manual_seed(3)
    pm = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    torch.manual_seed(5)
    for i in ("0", "2"):
        b = torch.randn_like(ours.get_submodule(i).lora_B.weight)
        with torch.no_grad():
            ours.get_submodule(i).lora_B.weight.copy_(b)
            pm.base_model.model.get_submodule(i).lora_B["default"].weight.copy_(b)
    return ours, pm


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False),
                                            (torch.float32, True)])
def test_forward_and_grads_bitwise_peft(dtype: torch.dtype, autocast: bool) -> None:
    ours, pm = _pair(dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)  # (batch, tokens, in)
    grads = []
    for model in (ours, pm):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(xi)
        out.float().square().sum().backward()
        named = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                 for n, p in model.named_parameters() if p.requires_grad}
        grads.append((out, xi.grad, named))
    (out, gx, g), (ref, ref_gx, ref_g) = grads
    assert torch.equal(out, ref)
    assert torch.equal(gx, ref_gx)
    assert g.keys() == ref_g.keys() and len(g) == 4
    for k in g:
        assert torch.equal(g[k], ref_g[k]), k


def test_fp32_base_output_is_reused() -> None:
    ours, _ = _pair(torch.float32)
    layer = ours.get_submodule("0")
    seen = []
    base_forward = layer.base_layer.forward

    def spy(x: torch.Tensor) -> torch.Tensor:
        y = base_forward(x)
        seen.append(y)
        return y

    layer.base_layer.forward = spy  # an instance attribute: no hook, type unchanged
    out = layer(torch.randn(3, 32))
    assert out.data_ptr() == seen[0].data_ptr()  # the sum went into the base output's buffer


def test_forward_hook_keeps_out_of_place() -> None:
    ours, _ = _pair(torch.float32)
    layer = ours.get_submodule("0")
    seen = []
    layer.base_layer.register_forward_hook(lambda m, i, o: seen.append((o, o.clone())))
    out = layer(torch.randn(3, 32))
    held, copy = seen[0]
    assert torch.equal(held, copy)  # what the hook holds was not modified
    assert out.data_ptr() != held.data_ptr()
