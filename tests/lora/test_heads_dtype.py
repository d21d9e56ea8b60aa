"""A trained fp32 head copy on a 16-bit base, outside autocast: it runs, in its own dtype."""
from __future__ import annotations

import torch

from lora import LoRAConfig, add_lora
from tests.models import tiny_bert_classifier
from train.adapters import build_adapted
from train.config import ModelConfig


def test_fp32_head_copy_accepts_bf16_hidden_states_without_autocast():
    model = build_adapted(tiny_bert_classifier(num_labels=2).to(torch.bfloat16),
                          ModelConfig(method="lora", target_modules=("query", "value")), "seq_cls")
    ids = torch.randint(1, 100, (2, 7))
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    assert out.logits.dtype == torch.float32
    out.loss.backward()
    head = model.classifier.trained
    assert head.weight.dtype == torch.float32 and head.weight.grad is not None
    # the same numbers as running the head by hand on the (upcast) bf16 pooled output
    pooled = model.bert(input_ids=ids).pooler_output
    torch.testing.assert_close(out.logits, head(pooled.float()), rtol=0, atol=0)


def test_same_dtype_head_is_untouched():
    base = tiny_bert_classifier(num_labels=2)
    add_lora(base, LoRAConfig(target_modules=("query",), modules_to_save=("classifier",)))
    x = torch.randn(3, base.config.hidden_size)
    assert torch.equal(base.classifier(x), base.classifier.trained(x))
