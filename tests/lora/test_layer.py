"""LoRALinear on its own: config validation, 16-bit bases, the quantized-base rules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lora import LINEAR_TYPES, LoRAConfig, LoRALinear, add_lora, merge_lora, remove_lora
from lora import targets as targets_mod


@pytest.mark.parametrize("kwargs, word", [
    (dict(r=0), "r=0"), (dict(r=-2), "r=-2"), (dict(r=2.0), "r=2.0"), (dict(alpha=0), "alpha=0"),
    (dict(dropout=1.0), "dropout=1.0"), (dict(dropout=-0.1), "dropout=-0.1"), (dict(bias="some"), "bias='some'"),
    (dict(target_modules=[]), "target_modules"), (dict(target_modules="(["), "target_modules='(['"),
    (dict(target_modules=["q", 3]), "3"), (dict(modules_to_save="classifier"), "modules_to_save='classifier'"),
    (dict(use_dora="yes"), "use_dora='yes'"),
])
def test_config_rejects_bad_values(kwargs, word) -> None:
    with pytest.raises(ValueError) as err:
        LoRAConfig(**kwargs)
    assert word in str(err.value)


def test_config_normalizes() -> None:
    cfg = LoRAConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], use_rslora=True, r=4,
                     alpha=16)
    assert cfg.target_modules == ("q_proj", "v_proj") and cfg.modules_to_save == ("classifier",)
    assert cfg.scaling == 16 / math.sqrt(4)
    assert LoRAConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"
    with pytest.raises(Exception):
        cfg.r = 2  # frozen


def test_layer_rejects_bad_rank_and_base() -> None:
    with pytest.raises(ValueError, match="r=0"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(TypeError, match="LayerNorm"):
        LoRALinear(nn.LayerNorm(4), r=2)


def test_bf16_base_matches_peft() -> None:
    """On a bf16 base the adapters are fp32 holding bf16-rounded initial values, the sum is done in
    fp32 and rounded once, and the seeded init is peft's."""
    from peft import LoraConfig, get_peft_model

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)).to(torch.bfloat16)

    ours, ref = make(), make()
    torch.manual_seed(7)
    add_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=True))
    torch.manual_seed(7)
    pm = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True))
    for i in ("0", "2"):
        mine, theirs = ours.get_submodule(i), pm.base_model.model.get_submodule(i)
        assert mine.lora_A.weight.dtype == torch.float32
        assert torch.equal(mine.lora_A.weight, mine.lora_A.weight.bfloat16().float())  # bf16-rounded
        assert torch.equal(mine.lora_A.weight, theirs.lora_A["default"].weight)
        assert torch.equal(mine.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)
        with torch.no_grad():
            b = torch.randn_like(mine.lora_B.weight)
            mine.lora_B.weight.copy_(b)
            theirs.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    out, ref_out = ours(x), pm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref_out)


class FakeQuantLinear(nn.Module):
    """A stand-in for a 4-bit base: bf16-rounded weight, bf16 compute, output in the input dtype."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = torch.bfloat16
        self.register_buffer("packed", torch.randn(out_features, in_features).bfloat16())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.compute_dtype) @ self.packed.t()).to(x.dtype)


def test_quantized_base_rules(monkeypatch) -> None:
    """Quantized base: adapters round through compute_dtype, the LoRA output is cast to the result
    dtype before the add (peft's QLoRA rule), DoRA reads the dequantized weight, merge refuses."""
    torch.manual_seed(0)
    model = nn.Sequential(FakeQuantLinear(32, 16))
    monkeypatch.setattr(targets_mod, "LINEAR_TYPES", LINEAR_TYPES + (FakeQuantLinear,))
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0"]))
    layer = model[0]
    assert torch.equal(layer.lora_A.weight, layer.lora_A.weight.bfloat16().float())
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 32).bfloat16()
    base = layer.base_layer(x)
    lora = layer.lora_B(layer.lora_A(x.float())) * layer.scaling
    expected = base + lora.to(torch.bfloat16)           # cast, then add in bf16
    promoted = (base + lora).to(torch.bfloat16)          # the plain-linear rule
    assert not torch.equal(expected, promoted)           # the two rules differ on this data
    assert torch.equal(layer(x), expected)
    with pytest.raises(RuntimeError, match="dequantize_model"):
        merge_lora(model)
    assert not layer.merged
    with pytest.raises(RuntimeError, match="dequantize_model"):
        remove_lora(model, merge=True)
    assert isinstance(model[0], LoRALinear)  # unchanged on error
    remove_lora(model)

    dora = LoRALinear(model[0], r=4, alpha=8, use_dora=True)
    w = model[0].dequantize(torch.float32)
    assert_close(dora.lora_magnitude_vector, torch.linalg.norm(w, dim=1).bfloat16().float(), atol=0, rtol=0)


class PackedNoDequant(nn.Module):
    """A base whose weight is packed uint8 codes and that cannot dequantize."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 8, 4
        self.register_buffer("weight", torch.zeros(16, 1, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :4].bfloat16()


def test_packed_base_without_dequantize() -> None:
    """Such a base is treated as quantized (cast rule, no merge) and DoRA says what it lacks."""
    layer = LoRALinear(PackedNoDequant(), r=2)
    assert layer.quantized
    with pytest.raises(RuntimeError, match="dequantize_model"):
        layer.merge()
    with pytest.raises(TypeError, match="no dequantize"):
        LoRALinear(PackedNoDequant(), r=2, use_dora=True)
