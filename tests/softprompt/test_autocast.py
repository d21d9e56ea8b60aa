"""Under bf16 autocast on CPU, training equals peft's bit for bit (logits, loss, grads, 3 AdamW steps).

P-Tuning is the sensitive case: its encoder runs in bf16 under autocast, so the prompt reaches
the batch as bf16 and the order "broadcast over the batch, then cast" decides whether the
backward sums the per-row gradients in bf16 (peft) or in fp32.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from softprompt import PromptConfig
from tests.softprompt.pairs import batch, build_pair, causal_labels, peft_head_params, peft_prompt_params

EXACT = dict(atol=0.0, rtol=0.0)
STEPS = 3
METHODS = {
    "prompt": PromptConfig(method="prompt", n_virtual=5),
    "ptuning_mlp": PromptConfig(method="ptuning", n_virtual=5, encoder="mlp"),
    "ptuning_lstm": PromptConfig(method="ptuning", n_virtual=5, encoder="lstm"),
}
CASES = [("bert", "seq_cls", m) for m in METHODS] + [("llama", "causal_lm", m) for m in METHODS]


def _trainable(ref) -> list[torch.nn.Parameter]:
    return [p for p in ref.parameters() if p.requires_grad]


@pytest.mark.parametrize("family, task, method", CASES)
def test_bf16_autocast_training_equals_peft(family, task, method):
    """Each step: logits and loss equal; every encoder (and head) gradient equal; after the
    AdamW steps every trainable tensor equal. All bitwise."""
    ours, ref = build_pair(family, METHODS[method], task=task)
    data = batch(family, pad="right", token_types=(family == "bert"))
    labels = torch.tensor([0, 2, 1]) if task == "seq_cls" else causal_labels(data)
    ours_enc, ref_enc = dict(ours.prompt_encoder.named_parameters()), peft_prompt_params(ref)
    assert set(ours_enc) == set(ref_enc)
    opt = torch.optim.AdamW(ours.adapter_parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(_trainable(ref), lr=1e-2)
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref_out = ours(**data, labels=labels), ref(**data, labels=labels)
        assert_close(out.logits, ref_out.logits, **EXACT, msg=lambda m: f"step {step} logits: {m}")
        assert_close(out.loss, ref_out.loss, **EXACT, msg=lambda m: f"step {step} loss: {m}")
        out.loss.backward()
        ref_out.loss.backward()
        for name, p in ours_enc.items():
            assert_close(p.grad, ref_enc[name].grad, **EXACT, msg=lambda m: f"step {step} {name}.grad: {m}")
        if ours.head is not None:
            heads = peft_head_params(ref)
            for name, p in ours.head.named_parameters():
                assert_close(p.grad, heads[name].grad, **EXACT, msg=lambda m: f"step {step} head {name}: {m}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for name, p in ours_enc.items():
        assert_close(p, ref_enc[name], **EXACT, msg=lambda m: f"{name} after {STEPS} steps: {m}")
