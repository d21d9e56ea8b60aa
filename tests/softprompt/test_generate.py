"""generate(): token-identical to peft (transformers <= 5.23) and to a no-cache step-by-step decode
(any transformers version, 5.24's ``cache`` rename included)."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from torch import nn

from softprompt import PromptConfig, filter_logits
from tests.softprompt.pairs import batch, build_pair

PEFT_GENERATE_OK = Version(transformers.__version__) < Version("5.24.0")  # peft re-injects on 5.24
NEW = 20
CFG = PromptConfig(method="prompt", n_virtual=4)
CFG_PT = PromptConfig(method="ptuning", n_virtual=4, encoder="lstm")


def _peft_generate(ref, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.generate(**data, max_new_tokens=NEW, **kwargs)


def reference_decode(pm, input_ids, attention_mask, steps, eos=None, pad=0):
    """No cache: every step runs the whole [prompt; ids so far] with default positions and the
    mask prefixed by ones; greedy; finished rows get pad (peft's reference, §5)."""
    emb = pm.backbone.get_input_embeddings()
    prompt = pm.prompt()  # (n, d)
    b, n = input_ids.shape[0], prompt.shape[0]
    ids, mask = input_ids, attention_mask
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for _ in range(steps):
        tokens = emb(ids)
        embeds = torch.cat([prompt.to(tokens.dtype).expand(b, n, -1), tokens], dim=1)
        full_mask = torch.cat([mask.new_ones(b, n), mask], dim=1)
        logits = pm.backbone(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False).logits
        nxt = logits[:, -1].float().argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        if eos is not None:
            done = done | (nxt == eos)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        if eos is not None and bool(done.all()):
            break
    return ids


@pytest.mark.skipif(not PEFT_GENERATE_OK, reason="peft 0.21.2 generation is wrong on transformers >= 5.24")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pad", ["none", "left"])
@pytest.mark.parametrize("cfg", [CFG, CFG_PT], ids=["prompt", "ptuning_lstm"])
def test_greedy_equals_peft(family, pad, cfg):
    ours, ref = build_pair(family, cfg)
    data = batch(family, b=3, length=6, pad=pad, seed=5)
    with torch.no_grad():
        out = ours.generate(**data, max_new_tokens=NEW)
        ref_out = _peft_generate(ref, data, do_sample=False)
    assert out.shape == ref_out.shape == (3, 6 + NEW)
    assert torch.equal(out[:, :6], data["input_ids"])  # no virtual tokens in the output
    assert torch.equal(out, ref_out)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "qwen2"])
@pytest.mark.parametrize("pad", ["none", "left"])
def test_greedy_equals_no_cache_decode(family, pad):
    """Independent of peft and of the transformers version: the cached loop equals a full
    recompute at every step. eos is disabled so all 20 steps are compared."""
    ours, _ = build_pair(family, CFG_PT)
    data = batch(family, b=3, length=6, pad=pad, seed=7)
    with torch.no_grad():
        out = ours.generate(**data, max_new_tokens=NEW, eos_token_id=[])
        ref = reference_decode(ours, data["input_ids"], data["attention_mask"], NEW)
    assert torch.equal(out, ref)


def test_eos_stops_and_pads():
    """With eos set to the first greedy token of row 0, row 0 is padded afterwards."""
    ours, _ = build_pair("llama", CFG)
    data = batch("llama", b=2, length=6, pad="left", seed=3)
    with torch.no_grad():
        free = ours.generate(**data, max_new_tokens=5, eos_token_id=[])
        eos = int(free[0, 6])
        out = ours.generate(**data, max_new_tokens=5, eos_token_id=eos, pad_token_id=0)
        ref = reference_decode(ours, data["input_ids"], data["attention_mask"], 5, eos=eos, pad=0)
    assert torch.equal(out, ref)
    assert out[0, 7:].eq(0).all()


@pytest.mark.skipif(not PEFT_GENERATE_OK, reason="peft 0.21.2 generation is wrong on transformers >= 5.24")
def test_sampling_equals_peft_same_seed():
    """Sampling with temperature, top-k and top-p draws the same tokens as peft/HF from one seed."""
    ours, ref = build_pair("gpt2", CFG)
    data = batch("gpt2", b=2, length=5, pad="left", seed=9)
    knobs = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9)
    with torch.no_grad():
        torch.manual_seed(0)
        out = ours.generate(**data, max_new_tokens=NEW, **knobs)
        torch.manual_seed(0)
        ref_out = _peft_generate(ref, data, **knobs)
    assert torch.equal(out, ref_out)


def test_filter_logits_keeps_top_mass():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    probs = logits.softmax(-1)[0]
    assert kept[0, :2].all() and probs[:2].sum() >= 0.8 and probs[:1].sum() < 0.8
    assert not kept[0, 2:].any()


class RenamedCache(nn.Module):
    """A backbone whose forward takes and returns the cache as ``cache`` (transformers 5.24's
    spelling), built over a 5.23 model, so the rename is tested on any installed version."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.generation_config = inner.generation_config
        self.calls: list[tuple[str, int, bool]] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache=None, use_cache=None):
        x = input_ids if input_ids is not None else inputs_embeds
        self.calls.append(("ids" if input_ids is not None else "embeds", x.shape[1], cache is not None))
        kwargs = {} if cache is None else {"past_key_values": cache}
        out = self.inner(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=use_cache, **kwargs)
        return transformers.modeling_outputs.ModelOutput(logits=out.logits, cache=out.past_key_values)


def test_cache_kwarg_renamed_as_in_transformers_5_24():
    ours, _ = build_pair("llama", CFG)
    data = batch("llama", b=2, length=6, pad="left", seed=11)
    with torch.no_grad():
        expected = ours.generate(**data, max_new_tokens=6, eos_token_id=[])
        wrapped = RenamedCache(ours.backbone)
        ours.backbone = wrapped
        out = ours.generate(**data, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out, expected)
    # prefill once with the prompt (4 + 6 positions), then one id per step with the cache
    assert wrapped.calls == [("embeds", 10, False)] + [("ids", 1, True)] * 5


def test_generate_refuses_right_padding():
    ours, _ = build_pair("llama", CFG)
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(**batch("llama", pad="right"), max_new_tokens=2)
