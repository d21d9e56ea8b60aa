"""The shared injection: any AdapterLayer built by a method gets the same surgery, walk, training
set, save/remove/merge behaviour (what LoRA, embedding LoRA and IA3 are built on)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora import AdapterLayer, IA3Config, LoRAConfig, TrainedCopy, add_ia3, add_lora, inject_adapters
from lora import lora_parameters, lora_state_dict, merge_lora, remove_lora, unmerge_lora
from lora.inject import lora_state
from lora.targets import resolve_heads, resolve_targets

from .conftest import base_model, batch


class Scale(AdapterLayer):
    """A toy method: the base output times one trainable scalar."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer, self.merged = base, False
        self.s = nn.Parameter(torch.ones(()))

    def adapter_params(self):
        return {"s": self.s}

    def forward(self, x):
        return self.base_layer(x) if self.merged else self.base_layer(x) * self.s

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight.mul_(self.s)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight.div_(self.s)
            self.merged = False


def test_a_new_method_gets_the_shared_surgery():
    model = base_model("llama")
    originals = dict(model.named_modules())
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
    heads = resolve_heads(model, ("lm_head",))
    targets = resolve_targets(model, ("o_proj",), exclude=heads, embeddings=False, what="Scale")
    config = object()
    inject_adapters(model, config, targets, lambda name, module: Scale(module), heads)
    assert lora_state(model).config is config
    assert sorted(lora_state_dict(model)) == sorted([f"{t}.s" for t in targets] + ["lm_head.weight"])
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    assert isinstance(model.lm_head, TrainedCopy)
    with pytest.raises(ValueError, match="already has"):
        add_ia3(model, IA3Config())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Scale):
                m.s.fill_(1.5)
        scaled = model(input_ids=ids).logits
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=ids).logits, scaled, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
    remove_lora(model)
    assert all(m is originals[n] for n, m in model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-6, rtol=1e-6)


def test_methods_exclude_each_other():
    """One adapter per model, whatever the methods: a second add raises and changes nothing."""
    model = add_lora(base_model("llama"), LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_ia3(model, IA3Config())
    model = add_ia3(base_model("llama"), IA3Config())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, LoRAConfig())
