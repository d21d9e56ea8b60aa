"""Forward, gradients and short training equal peft's, built in the same test (fp32)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from softprompt import PromptConfig, trainable_summary
from tests.models import tiny_tokenizer
from tests.softprompt.pairs import (INIT_TEXT, batch, build_pair, causal_labels, peft_head_params,
                                    peft_prompt_params)

TOL = dict(atol=1e-6, rtol=1e-6)
FAMILIES = ["llama", "gpt2", "qwen2", "bloom"]
N_TEXT = len(tiny_tokenizer()(INIT_TEXT)["input_ids"])  # the seed example: n_virtual = token count
METHODS = {
    "prompt_random": PromptConfig(method="prompt", n_virtual=5),
    "prompt_text": PromptConfig(method="prompt", n_virtual=N_TEXT, init="text", init_text=INIT_TEXT),
    "prompt_text_repeat": PromptConfig(method="prompt", n_virtual=N_TEXT + 3, init="text", init_text=INIT_TEXT),
    "prompt_text_cut": PromptConfig(method="prompt", n_virtual=2, init="text", init_text=INIT_TEXT,
                                    truncate_init_text=True),
    "prompt_vocab": PromptConfig(method="prompt", n_virtual=5, init="vocab"),
    "ptuning_mlp": PromptConfig(method="ptuning", n_virtual=5, encoder="mlp"),
    "ptuning_mlp_h24": PromptConfig(method="ptuning", n_virtual=5, encoder="mlp", encoder_hidden=24),
    "ptuning_lstm": PromptConfig(method="ptuning", n_virtual=5, encoder="lstm"),
    "ptuning_lstm_3l": PromptConfig(method="ptuning", n_virtual=5, encoder="lstm", encoder_num_layers=3,
                                    encoder_hidden=8),
}


def _prompt_grads_equal(ours, ref) -> None:
    ours_named = dict(ours.prompt_encoder.named_parameters())
    ref_named = peft_prompt_params(ref)
    assert set(ours_named) == set(ref_named)
    for name, p in ours_named.items():
        assert p.grad is not None, name
        assert_close(p.grad, ref_named[name].grad, **TOL, msg=lambda m: f"{name}: {m}")


CORE = ["prompt_random", "prompt_text", "ptuning_mlp", "ptuning_lstm"]
# every method on llama; the core methods on the other families (they share the code path)
CAUSAL_CASES = [("llama", m) for m in METHODS] + [(f, m) for f in FAMILIES[1:] for m in CORE]


@pytest.mark.parametrize("family, method", CAUSAL_CASES)
def test_causal_lm_logits_loss_grads(family, method, tmp_path):
    """Right-padded batch with labels: logits, loss and prompt/encoder gradients equal peft's."""
    ours, ref = build_pair(family, METHODS[method], tmp_path=tmp_path)
    for (n1, p1), (n2, p2) in zip(ours.prompt_encoder.named_parameters(), peft_prompt_params(ref).items()):
        assert_close(p1, p2, atol=0, rtol=0)  # the same seeded init, bit for bit
    data = batch(family, pad="right")
    labels = causal_labels(data)
    out, ref_out = ours(**data, labels=labels), ref(**data, labels=labels)
    assert out.logits.shape == (3, METHODS[method].n_virtual + 7, 512)
    assert_close(out.logits, ref_out.logits, **TOL)
    assert_close(out.loss, ref_out.loss, **TOL)
    out.loss.backward()
    ref_out.loss.backward()
    _prompt_grads_equal(ours, ref)


@pytest.mark.parametrize("method", ["prompt_random", "ptuning_mlp", "ptuning_lstm"])
def test_bert_classification_with_token_types(method, tmp_path):
    """BERT pools the first virtual token; token_type_ids get zeros; the head copy trains."""
    ours, ref = build_pair("bert", METHODS[method], task="seq_cls", tmp_path=tmp_path)
    data = batch("bert", pad="right", token_types=True)
    labels = torch.tensor([0, 2, 1])
    out, ref_out = ours(**data, labels=labels), ref(**data, labels=labels)
    assert out.logits.shape == (3, 3)
    assert_close(out.logits, ref_out.logits, **TOL)
    assert_close(out.loss, ref_out.loss, **TOL)
    out.loss.backward()
    ref_out.loss.backward()
    _prompt_grads_equal(ours, ref)
    heads = peft_head_params(ref)
    for name, p in ours.head.named_parameters():
        assert_close(p.grad, heads[name].grad, **TOL)
    # the backbone's own head stays frozen and untouched
    assert all(not p.requires_grad and p.grad is None for p in ours.backbone.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_classification_left_padded(family, tmp_path):
    ours, ref = build_pair(family, METHODS["prompt_random"], task="seq_cls", tmp_path=tmp_path)
    data = batch(family, pad="left")
    labels = torch.tensor([1, 0, 2])
    out, ref_out = ours(**data, labels=labels), ref(**data, labels=labels)
    assert_close(out.logits, ref_out.logits, **TOL)
    assert_close(out.loss, ref_out.loss, **TOL)


@pytest.mark.parametrize("family, method, task", [
    ("llama", "prompt_random", "causal_lm"), ("gpt2", "ptuning_mlp", "causal_lm"),
    ("qwen2", "ptuning_lstm", "causal_lm"), ("bert", "ptuning_mlp", "seq_cls")])
def test_five_adamw_steps_same_losses(family, method, task, tmp_path):
    """Five AdamW steps on the same batches give the same losses and the same final prompt."""
    ours, ref = build_pair(family, METHODS[method], task=task, tmp_path=tmp_path)
    ours.train()
    ref.train()
    opt = torch.optim.AdamW(ours.adapter_parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    losses, ref_losses = [], []
    for step in range(5):
        data = batch(family, pad="right", seed=step, token_types=task == "seq_cls")
        labels = causal_labels(data) if task == "causal_lm" else torch.tensor([0, 1, 2])
        for model, optim, log in ((ours, opt, losses), (ref, ref_opt, ref_losses)):
            optim.zero_grad()
            torch.manual_seed(step)  # the backbones' dropout (gpt2, bert) draws the same masks
            loss = model(**data, labels=labels).loss
            loss.backward()
            optim.step()
            log.append(loss.detach())
    assert_close(torch.stack(losses), torch.stack(ref_losses), **TOL)
    assert losses[-1] < losses[0]
    ours.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(ours.prompt(), ref.get_prompt(1)[0], **TOL)


@pytest.mark.parametrize("family, method, task", [
    ("llama", "prompt_random", "causal_lm"), ("gpt2", "ptuning_mlp", "causal_lm"),
    ("llama", "ptuning_lstm", "causal_lm"), ("bert", "prompt_random", "seq_cls")])
def test_trainable_summary_matches_peft(family, method, task, tmp_path):
    ours, ref = build_pair(family, METHODS[method], task=task, tmp_path=tmp_path)
    trainable, total = ref.get_nb_trainable_parameters()
    pct = 100 * trainable / total
    assert trainable_summary(ours) == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
