"""Prefix tuning against references that need neither peft nor one transformers version:
the cache layout, prefixes equal to a real context, decoding against a full recompute, options
and errors. (These run on transformers 5.23 and 5.24 alike.)"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from softprompt import PrefixConfig, PrefixModel, prefix_geometry
from tests.models import tiny_causal_lm
from tests.softprompt.prefix_pairs import CAUSAL, backbone, ragged_batch


def _layer_kv(cache, layer: int):
    entry = cache.layers[layer]
    return entry.keys, entry.values


@pytest.mark.parametrize("family, heads, dim", [("llama", 2, 4), ("qwen2", 2, 4), ("mistral", 2, 4),
                                                ("gpt2", 4, 4), ("bert", 4, 4)])
def test_cache_shapes_and_layout(family, heads, dim):
    """Layer l's key is row chunk 2l and its value chunk 2l+1, split (head, dim): [B, H_kv, n, D]."""
    pm = PrefixModel(backbone(family, "causal_lm" if family != "bert" else "seq_cls"), PrefixConfig(n_virtual=5))
    geo = pm.geometry
    assert (geo.n_layers, geo.kv_heads, geo.head_dim) == (2, heads, dim)
    cache = pm.prefix_kv(3)
    table = pm.prefix().detach()  # (n, 2 * L * H * D)
    for layer in range(2):
        key, value = _layer_kv(cache, layer)
        assert key.shape == value.shape == (3, heads, 5, dim)
        for kv, t in ((0, key), (1, value)):
            start = (2 * layer + kv) * heads * dim
            want = table[:, start:start + heads * dim].reshape(5, heads, dim).transpose(0, 1)  # (H, n, D)
            assert torch.equal(t[2], want)


@pytest.mark.parametrize("family, task", [(f, "causal_lm") for f in CAUSAL] + [(f, "seq_cls") for f in
                                                                               ("bert", *CAUSAL)])
def test_every_layer_reads_its_prefix(family, task):
    """The cache reaches the attention under this transformers version's keyword: every layer's
    key and value slice gets a gradient, and the output moves off the bare backbone's."""
    pm = PrefixModel(backbone(family, task), PrefixConfig(n_virtual=3), task=task)
    data = ragged_batch()
    out = pm(**data)
    with torch.no_grad():
        bare = pm.backbone(**data).logits
    assert not torch.allclose(out.logits, bare)
    out.logits.square().sum().backward()
    grad = pm.prefix_encoder.embedding.weight.grad.view(3, 2 * pm.geometry.n_layers, -1)
    assert bool((grad.abs().sum(dim=(0, 2)) > 0).all())


@pytest.mark.parametrize("family", CAUSAL)
def test_prefix_of_real_keys_equals_that_context(family):
    """Fill the table with the keys/values the backbone computes for a real context P: the
    model's logits on x then equal the backbone's on [P; x] at the x positions (layout and
    positions right, independent of peft)."""
    model = tiny_causal_lm(family)
    context = torch.randint(3, 500, (1, 4))
    x = torch.randint(3, 500, (2, 6))
    with torch.no_grad():
        past = model(input_ids=context, use_cache=True).past_key_values
        pm = PrefixModel(model, PrefixConfig(n_virtual=4))
        rows = []
        for layer in range(pm.geometry.n_layers):
            for t in _layer_kv(past, layer):  # (1, H, 4, D) -> (4, H * D)
                rows.append(t[0].transpose(0, 1).reshape(4, -1))
        pm.prefix_encoder.embedding.weight.copy_(torch.cat(rows, dim=1))
        full = model(input_ids=torch.cat([context.expand(2, -1), x], dim=1)).logits[:, 4:]
        assert_close(pm(input_ids=x).logits, full, atol=1e-5, rtol=1e-5)
        mask = torch.ones_like(x)
        assert_close(pm(input_ids=x, attention_mask=mask).logits, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", CAUSAL)
def test_classifier_prefix_of_real_keys_equals_that_context(family):
    """The same for a decoder classifier (right padding; its head finds the last real token from
    input_ids), so classification is checked without peft (peft's SEQ_CLS breaks on 5.24)."""
    model = backbone(family, "seq_cls")
    context = torch.randint(3, 500, (1, 4))
    data = ragged_batch(pad="right")
    with torch.no_grad():
        past = model.base_model(input_ids=context, use_cache=True).past_key_values
        pm = PrefixModel(model, PrefixConfig(n_virtual=4), task="seq_cls")
        rows = [t[0].transpose(0, 1).reshape(4, -1) for layer in range(2) for t in _layer_kv(past, layer)]
        pm.prefix_encoder.embedding.weight.copy_(torch.cat(rows, dim=1))
        ids = torch.cat([context.expand(3, -1), data["input_ids"]], dim=1)
        mask = torch.cat([torch.ones(3, 4, dtype=torch.long), data["attention_mask"]], dim=1)
        assert_close(pm(**data).logits, model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


def _recompute_greedy(pm: PrefixModel, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """No cache reuse: the whole sequence each step, positions from the mask (as HF's generate)."""
    for _ in range(steps):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        nxt = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
    return ids


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("projection", [False, True])
def test_generate_equals_full_recompute(family, projection):
    """HF generate with the prefilled cache (left padding) equals a full recompute per step."""
    torch.manual_seed(0)
    pm = PrefixModel(tiny_causal_lm(family), PrefixConfig(n_virtual=4, projection=projection)).eval()
    data = ragged_batch(pad="left")
    out = pm.generate(data["input_ids"], attention_mask=data["attention_mask"], max_new_tokens=5,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = _recompute_greedy(pm, data["input_ids"], data["attention_mask"], 5)
    assert torch.equal(out, want)


def test_generate_beams_and_sampling_run():
    """HF repeats each row num_beams x num_return_sequences times; the cache is built to match."""
    pm = PrefixModel(tiny_causal_lm("llama"), PrefixConfig(n_virtual=3)).eval()
    ids = torch.randint(3, 500, (2, 5))
    beams = pm.generate(ids, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    assert beams.shape == (4, 8) and torch.equal(beams[:, :5], ids.repeat_interleave(2, 0))
    torch.manual_seed(1)
    sampled = pm.generate(ids, max_new_tokens=3, do_sample=True, top_k=5, pad_token_id=0, eos_token_id=None)
    assert sampled.shape == (2, 8)


def test_backbone_outputs_pass_through():
    """Extra forward options reach the backbone; hidden states cover the input positions only."""
    pm = PrefixModel(tiny_causal_lm("qwen2"), PrefixConfig(n_virtual=3))
    out = pm(input_ids=torch.randint(3, 500, (2, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (2, 5, 16)
    assert pm.get_output_embeddings() is pm.backbone.lm_head
    assert pm.get_input_embeddings() is pm.backbone.get_input_embeddings()


def test_dropout_is_per_row_in_training_only():
    """dropout (not peft) zeroes prefix entries in training, one mask per row; eval is exact."""
    torch.manual_seed(0)
    pm = PrefixModel(tiny_causal_lm("llama"), PrefixConfig(n_virtual=8, dropout=0.5))
    pm.train()
    key = _layer_kv(pm.prefix_kv(2), 0)[0]
    assert (key == 0).float().mean() > 0.2 and not torch.equal(key[0], key[1])
    pm.eval()
    key, flat = _layer_kv(pm.prefix_kv(2), 0)[0], pm.prefix().detach()
    assert torch.equal(key[0], flat[:, :8].reshape(8, 2, 4).transpose(0, 1))


def test_backbone_is_never_modified():
    model = tiny_causal_lm("gpt2")
    before = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    pm = PrefixModel(model, PrefixConfig(n_virtual=3, projection=True))
    data = ragged_batch()
    pm(**data, labels=data["input_ids"]).loss.backward()
    torch.optim.AdamW(pm.adapter_parameters(), lr=0.1).step()
    pm.eval().generate(data["input_ids"][:1], max_new_tokens=2, pad_token_id=0)
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["bloom", "opt"])
def test_unsupported_architecture_is_refused(family):
    with pytest.raises(ValueError, match=rf"prefix tuning supports model types .*got model_type='{family}'"):
        PrefixModel(tiny_causal_lm(family), PrefixConfig(n_virtual=3))
    with pytest.raises(ValueError, match="prefix tuning supports model types"):
        prefix_geometry(torch.nn.Linear(2, 2))


def test_bad_inputs_are_named():
    model = tiny_causal_lm("llama")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        PrefixModel(model, PrefixConfig(n_virtual=3))
    pm = PrefixModel(tiny_causal_lm("llama"), PrefixConfig(n_virtual=3))
    pm.backbone.gradient_checkpointing_enable()  # switched on after wrapping (as a training loop may)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        pm.train()(input_ids=torch.randint(3, 500, (2, 5)))
    with pytest.raises(ValueError, match="task='tagging'"):
        PrefixModel(tiny_causal_lm("llama"), PrefixConfig(n_virtual=3), task="tagging")
    pm = PrefixModel(tiny_causal_lm("llama"), PrefixConfig(n_virtual=3))
    ids = torch.randint(3, 500, (2, 5))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); expected \(2, 5\)"):
        pm(input_ids=ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="past_key_values= is not accepted: the prefix is the cache"):
        pm(input_ids=ids, past_key_values=pm.prefix_kv(2))
    with pytest.raises(ValueError, match="give input_ids or inputs_embeds"):
        pm()
    with pytest.raises(ValueError, match="exceeds the model's maximum of 64 positions"):
        pm(input_ids=torch.randint(3, 500, (1, 62)))
    with pytest.raises(ValueError, match="exceeds the model's maximum of 64 positions"):
        pm.generate(torch.randint(3, 500, (1, 50)), max_new_tokens=12)
    with pytest.raises(ValueError, match="generate\\(\\) builds position_ids itself"):
        pm.generate(ids, position_ids=ids)
    cls = PrefixModel(backbone("bert", "seq_cls"), PrefixConfig(n_virtual=3), task="seq_cls")
    with pytest.raises(ValueError, match="generate\\(\\) needs task='causal_lm'"):
        cls.generate(ids)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_virtual=0), "n_virtual=0; expected a positive int"),
    (dict(n_virtual=True), "n_virtual=True"),
    (dict(encoder_hidden=8), "encoder_hidden=8 is only used with projection=True"),
    (dict(projection=True, encoder_hidden=-1), "encoder_hidden=-1; expected None or a positive int"),
    (dict(projection="yes"), "projection='yes'; expected True or False"),
    (dict(init="normal"), r"init='normal'; expected one of \('random', 'zero'\)"),
    (dict(dropout=1.0), r"dropout=1.0; expected a float in \[0, 1\)"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixConfig(**kwargs)


def test_config_round_trips_and_names_unknown_keys():
    cfg = PrefixConfig(n_virtual=7, projection=True, encoder_hidden=32, init="zero", dropout=0.1)
    assert PrefixConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown PrefixConfig keys \['num_virtual_tokens'\]"):
        PrefixConfig.from_dict({"num_virtual_tokens": 3})
