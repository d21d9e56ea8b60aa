"""Prefix tuning equals peft's PREFIX_TUNING, built in the same test (fp32): logits, gradients,
five AdamW losses and greedy generation, with and without the projection."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from softprompt import PrefixConfig, trainable_summary
from tests.softprompt.prefix_pairs import (CAUSAL, PEFT_GENERATE_OK, PEFT_SEQ_CLS_OK, PEFT_SEQ_CLS_SKIP, SEQ_CLS,
                                           build_prefix_pair, labels_for, peft_case, peft_encoder_params,
                                           peft_head_params, ragged_batch)

pytest.importorskip("peft")

TOL = dict(atol=0, rtol=0)  # bitwise: the same ops in the same order as peft
CONFIGS = {
    "table": PrefixConfig(n_virtual=4),
    "projection": PrefixConfig(n_virtual=4, projection=True),
    "projection_h24": PrefixConfig(n_virtual=3, projection=True, encoder_hidden=24),
    "zero": PrefixConfig(n_virtual=4, init="zero"),
    "projection_zero": PrefixConfig(n_virtual=4, projection=True, init="zero"),
}
CAUSAL_CASES = [(f, c) for f in CAUSAL for c in ("table", "projection")] + [
    ("llama", "projection_h24"), ("gpt2", "zero"), ("qwen2", "projection_zero")]


def _grads_equal(ours, ref) -> None:
    ours_named = dict(ours.prefix_encoder.named_parameters())
    ref_named = peft_encoder_params(ref)
    assert set(ours_named) == set(ref_named)
    for name, p in ours_named.items():
        assert p.grad is not None, name
        assert_close(p.grad, ref_named[name].grad, **TOL, msg=lambda m: f"{name}: {m}")
    if ours.head is not None:
        heads = peft_head_params(ref)
        assert set(heads) == {n for n, _ in ours.head.named_parameters()}
        for name, p in ours.head.named_parameters():
            assert_close(p.grad, heads[name].grad, **TOL, msg=lambda m: f"head {name}: {m}")


@pytest.mark.parametrize("family, config", CAUSAL_CASES)
def test_causal_lm_logits_loss_grads(family, config):
    """Right-padded batch with labels: the seeded init is peft's bit for bit; logits [B, L, V],
    loss and every prefix-encoder gradient equal peft's."""
    cfg = CONFIGS[config]
    ours, ref = build_prefix_pair(family, cfg)
    ref_named = peft_encoder_params(ref)
    for name, p in ours.prefix_encoder.named_parameters():
        assert torch.equal(p, ref_named[name]), name
    data = ragged_batch(pad="right")
    labels = labels_for("causal_lm", data)
    out, ref_out = ours(**data, labels=labels), ref(**data, labels=labels)
    assert out.logits.shape == (3, 7, 512)  # the prefix has no output positions
    assert_close(out.logits, ref_out.logits, **TOL)
    assert_close(out.loss, ref_out.loss, **TOL)
    out.loss.backward()
    ref_out.loss.backward()
    _grads_equal(ours, ref)
    assert all(p.grad is None for p in ours.backbone.parameters())


@pytest.mark.skipif(not PEFT_SEQ_CLS_OK, reason=PEFT_SEQ_CLS_SKIP)
@pytest.mark.parametrize("family", SEQ_CLS)
@pytest.mark.parametrize("config", ["table", "projection"])
def test_classification_logits_loss_grads(family, config):
    """BERT (the cache goes through the classifier to the encoder; the real [CLS] is pooled,
    token_type_ids kept) and decoder classifiers (right padding: the head finds the last real
    token from input_ids): logits, loss, prefix and head-copy gradients equal peft's."""
    ours, ref = build_prefix_pair(family, CONFIGS[config], task="seq_cls")
    data = ragged_batch(pad="right")
    if family == "bert":
        data["token_type_ids"] = (torch.arange(7)[None] >= 3).long().expand(3, -1) * data["attention_mask"]
    labels = labels_for("seq_cls", data)
    out, ref_out = ours(**data, labels=labels), ref(**data, labels=labels)
    assert out.logits.shape == (3, 3)
    assert_close(out.logits, ref_out.logits, **TOL)
    assert_close(out.loss, ref_out.loss, **TOL)
    out.loss.backward()
    ref_out.loss.backward()
    _grads_equal(ours, ref)
    assert all(not p.requires_grad and p.grad is None for p in ours.backbone.parameters())


def test_position_ids_are_shifted_like_peft():
    """Explicit position_ids move by n_virtual (the prefix holds positions 0..n-1)."""
    ours, ref = build_prefix_pair("llama", CONFIGS["table"])
    data = ragged_batch(pad="left")
    pos = (data["attention_mask"].cumsum(1) - 1).clamp(min=0)
    out, ref_out = ours(**data, position_ids=pos), ref(**data, position_ids=pos)
    assert_close(out.logits, ref_out.logits, **TOL)
    plain = ours(**data).logits  # without them the positions are n..n+L-1, pads included
    assert not torch.allclose(out.logits[1], plain[1])


@pytest.mark.parametrize("family, config, task", [pytest.param(*case, marks=peft_case(case[2])) for case in [
    ("llama", "table", "causal_lm"), ("qwen2", "projection", "causal_lm"), ("mistral", "table", "causal_lm"),
    ("gpt2", "projection", "causal_lm"), ("bert", "projection", "seq_cls"), ("llama", "table", "seq_cls")]])
def test_five_adamw_steps_same_losses(family, config, task):
    """Five AdamW steps on one batch in train mode (backbone dropout drawn from the same seed):
    the same losses and the same final prefixes."""
    ours, ref = build_prefix_pair(family, CONFIGS[config], task=task)
    ours.train()
    ref.train()
    opt = torch.optim.AdamW(ours.adapter_parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    losses, ref_losses = [], []
    data = ragged_batch(pad="right")
    labels = labels_for(task, data)
    for step in range(5):
        for model, optim, log in ((ours, opt, losses), (ref, ref_opt, ref_losses)):
            optim.zero_grad()
            torch.manual_seed(step)
            loss = model(**data, labels=labels).loss
            loss.backward()
            optim.step()
            log.append(loss.detach())
    assert_close(torch.stack(losses), torch.stack(ref_losses), **TOL)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        ref_flat = ref.prompt_encoder["default"](torch.arange(ours.config.n_virtual)[None])[0]
        assert_close(ours.prefix(), ref_flat, **TOL)


@pytest.mark.skipif(not PEFT_GENERATE_OK, reason="peft 0.21.2's generate is wrong on transformers >= 5.24")
@pytest.mark.parametrize("family, config", [(f, "table") for f in CAUSAL] + [("llama", "projection"),
                                                                              ("gpt2", "projection")])
def test_greedy_generation_equals_peft(family, config):
    """Left-padded batch, greedy: token-identical to peft's generate."""
    ours, ref = build_prefix_pair(family, CONFIGS[config])
    ours.eval()
    ref.eval()
    data = ragged_batch(pad="left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = ours.generate(data["input_ids"], attention_mask=data["attention_mask"], **kw)
    ref_out = ref.generate(**data, **kw)
    assert out.shape == (3, 13)
    assert torch.equal(out, ref_out)


@pytest.mark.parametrize("family, config, task", [pytest.param(*case, marks=peft_case(case[2])) for case in [
    ("llama", "projection", "causal_lm"), ("bert", "table", "seq_cls")]])
def test_trainable_summary_matches_peft(family, config, task):
    ours, ref = build_prefix_pair(family, CONFIGS[config], task=task)
    trainable, total = ref.get_nb_trainable_parameters()
    assert trainable_summary(ours) == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


@pytest.mark.skipif(not PEFT_GENERATE_OK, reason="peft 0.21.2's generate is wrong on transformers >= 5.24")
def test_beam_search_equals_peft():
    """num_beams=2 (HF repeats each row; the prefix cache is built for the repeated batch)."""
    ours, ref = build_prefix_pair("qwen2", CONFIGS["projection"])
    ours.eval()
    ref.eval()
    data = ragged_batch(pad="left")
    kw = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    assert torch.equal(ours.generate(data["input_ids"], attention_mask=data["attention_mask"], **kw),
                       ref.generate(**data, **kw))


@pytest.mark.parametrize("family, config, task", [pytest.param(*case, marks=peft_case(case[2])) for case in [
    ("llama", "table", "causal_lm"), ("llama", "projection", "causal_lm"), ("gpt2", "projection", "causal_lm"),
    ("bert", "projection", "seq_cls")]])
def test_bf16_autocast_matches_peft(family, config, task):
    """Under CPU bf16 autocast the MLP runs on the broadcast table, as peft's does, so even its
    low-precision weight gradients are peft's bit for bit."""
    ours, ref = build_prefix_pair(family, CONFIGS[config], task=task)
    data = ragged_batch()
    labels = labels_for(task, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref_out = ours(**data, labels=labels), ref(**data, labels=labels)
    assert_close(out.logits, ref_out.logits, **TOL)
    out.loss.backward()
    ref_out.loss.backward()
    _grads_equal(ours, ref)
