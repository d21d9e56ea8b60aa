"""generate() through Hugging Face's generate: token-identical to peft (transformers <= 5.23) and
to references that need no peft (any transformers version, 5.24's ``cache`` rename included):
a no-cache step-by-step decode, and HF's own ``inputs_embeds`` generation on unpadded rows."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from softprompt import PromptConfig, PromptInjection
from tests.softprompt.pairs import batch, build_pair

PEFT_GENERATE_OK = Version(transformers.__version__) < Version("5.24.0")  # peft re-injects on 5.24
needs_peft_generate = pytest.mark.skipif(not PEFT_GENERATE_OK,
                                         reason="peft 0.21.2 generation is wrong on transformers >= 5.24")
NEW = 20
EOS, PAD = 2, 0  # the tiny models' generation_config
CFG = PromptConfig(method="prompt", n_virtual=4)
CFG_PT = PromptConfig(method="ptuning", n_virtual=4, encoder="lstm")


def _peft_generate(ref, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.generate(**data, **kwargs)


def reference_decode(pm, input_ids, attention_mask, steps, eos=EOS, pad=PAD):
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


def native_embeds_generate(pm, input_ids, **kwargs):
    """HF's own generation from inputs_embeds [prompt; emb(ids)] (unpadded rows): it returns
    only the new ids, so the input ids are put in front."""
    emb = pm.backbone.get_input_embeddings()(input_ids)
    embeds = torch.cat([pm.prompt().expand(input_ids.shape[0], -1, -1).to(emb.dtype), emb], dim=1)
    new = pm.backbone.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                               **kwargs)
    return torch.cat([input_ids.repeat_interleave(kwargs.get("num_return_sequences", 1), dim=0), new], dim=1)


@needs_peft_generate
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("pad", ["none", "left"])
@pytest.mark.parametrize("cfg", [CFG, CFG_PT], ids=["prompt", "ptuning_lstm"])
def test_greedy_equals_peft(family, pad, cfg):
    ours, ref = build_pair(family, cfg)
    data = batch(family, b=3, length=6, pad=pad, seed=5)
    out = ours.generate(**data, max_new_tokens=NEW)
    ref_out = _peft_generate(ref, data, max_new_tokens=NEW, do_sample=False)
    assert out.shape == ref_out.shape == (3, 6 + NEW)
    assert torch.equal(out[:, :6], data["input_ids"])  # no virtual tokens in the output
    assert torch.equal(out, ref_out)


@needs_peft_generate
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampling_equals_peft_same_seed(family):
    """Sampling with temperature, top-k, top-p and a repetition penalty draws the same tokens
    as peft from one seed."""
    ours, ref = build_pair(family, CFG)
    data = batch(family, b=2, length=5, pad="left", seed=9)
    knobs = dict(max_new_tokens=NEW, do_sample=True, temperature=0.7, top_k=40, top_p=0.9,
                 repetition_penalty=1.3)
    torch.manual_seed(0)
    out = ours.generate(**data, **knobs)
    torch.manual_seed(0)
    ref_out = _peft_generate(ref, data, **knobs)
    assert torch.equal(out, ref_out)


@needs_peft_generate
def test_beam_search_and_scores_equal_peft():
    ours, ref = build_pair("llama", CFG_PT)
    data = batch("llama", b=2, length=6, pad="left", seed=4)
    knobs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, output_scores=True,
                 return_dict_in_generate=True)
    out, ref_out = ours.generate(**data, **knobs), _peft_generate(ref, data, **knobs)
    assert out.sequences.shape == (4, 6 + 8)
    assert torch.equal(out.sequences, ref_out.sequences)
    torch.testing.assert_close(out.sequences_scores, ref_out.sequences_scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "qwen2"])
@pytest.mark.parametrize("pad", ["none", "left"])
def test_greedy_equals_no_cache_decode(family, pad):
    """Independent of peft and of the transformers version: HF's cached generation with the
    prompt equals a full recompute at every step."""
    ours, _ = build_pair(family, CFG_PT)
    data = batch(family, b=3, length=6, pad=pad, seed=7)
    out = ours.generate(**data, max_new_tokens=NEW)
    with torch.no_grad():
        ref = reference_decode(ours, data["input_ids"], data["attention_mask"], NEW)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("knobs", [dict(do_sample=True, top_k=20, temperature=0.8),
                                   dict(num_beams=3, num_return_sequences=3, length_penalty=0.5)],
                         ids=["sampling", "beam"])
def test_sampling_and_beam_equal_native_inputs_embeds_generation(knobs):
    """Independent of peft: on unpadded rows the prompt through the hook generates what HF's
    own inputs_embeds generation does from [prompt; emb(ids)]."""
    ours, _ = build_pair("llama", CFG)
    data = batch("llama", b=2, length=6, pad="none", seed=2)
    torch.manual_seed(0)
    out = ours.generate(**data, max_new_tokens=10, **knobs)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = native_embeds_generate(ours, data["input_ids"], max_new_tokens=10, **knobs)
    assert torch.equal(out, ref)


def test_eos_stops_and_pads():
    """HF's EOS handling: with eos set to the first greedy token of row 0, row 0 is padded."""
    ours, _ = build_pair("llama", CFG)
    data = batch("llama", b=2, length=6, pad="left", seed=3)
    free = ours.generate(**data, max_new_tokens=5)
    eos = int(free[0, 6])
    out = ours.generate(**data, max_new_tokens=5, eos_token_id=eos, pad_token_id=PAD)
    with torch.no_grad():
        ref = reference_decode(ours, data["input_ids"], data["attention_mask"], 5, eos=eos, pad=PAD)
    assert torch.equal(out, ref)
    assert out[0, 7:].eq(PAD).all()


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_the_input_then_every_new_token():
    ours, _ = build_pair("gpt2", CFG)
    data = batch("gpt2", b=1, length=6, pad="none", seed=1)
    streamer = Collect()
    out = ours.generate(**data, max_new_tokens=7, streamer=streamer)
    assert streamer.ended and torch.equal(streamer.chunks[0].reshape(-1), data["input_ids"][0])
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:]])
    assert torch.equal(streamed, out[0, 6:]) and streamed.numel() == 7


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria_generation_config_and_max_length():
    ours, _ = build_pair("llama", CFG)
    data = batch("llama", b=2, length=6, pad="left", seed=8)
    full = ours.generate(**data, max_new_tokens=10)
    stopped = ours.generate(**data, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([StopAfter(9)]))
    assert torch.equal(stopped, full[:, :9])  # max_length-like rules count real tokens only
    assert torch.equal(ours.generate(**data, max_length=9), full[:, :9])
    cfg = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(ours.generate(**data, generation_config=cfg), full[:, :9])


def test_output_scores_match_the_tokens():
    ours, _ = build_pair("llama", CFG)
    data = batch("llama", b=2, length=6, pad="left", seed=6)
    out = ours.generate(**data, max_new_tokens=5, output_scores=True, return_dict_in_generate=True)
    assert len(out.scores) == 5
    picked = torch.stack([s.argmax(-1) for s in out.scores], dim=1)  # (B, 5)
    assert torch.equal(picked, out.sequences[:, 6:])


def test_prompt_enters_once_then_one_id_per_step():
    ours, _ = build_pair("llama", CFG)
    data = batch("llama", b=2, length=6, pad="left", seed=11)
    calls = []

    def record(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        calls.append(("embeds", x.shape[1]) if x is not None else ("ids", kwargs["input_ids"].shape[1]))
    handle = ours.backbone.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    ours.generate(**data, max_new_tokens=6)
    handle.remove()
    assert calls == [("embeds", 4 + 6)] + [("ids", 1)] * 5
    assert not ours.backbone._forward_pre_hooks  # the hook is gone after the call


def test_injection_reads_the_cache_under_either_name():
    """transformers 5.24 passes the cache as ``cache``: a filled cache there is not a prefill."""
    ours, _ = build_pair("llama", CFG)
    inj = PromptInjection(ours.prompt(), ours.backbone.get_input_embeddings())
    filled = DynamicCache()
    with torch.no_grad():
        ours.backbone(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=filled, use_cache=True)
    for name in ("past_key_values", "cache"):
        ids = torch.tensor([[9]])
        _, kw = inj(ours.backbone, (), {"input_ids": ids, "attention_mask": torch.ones(1, 4, dtype=torch.long), name: filled,
                         "position_ids": torch.tensor([[3]])})
        assert torch.equal(kw["input_ids"], ids) and "inputs_embeds" not in kw and "position_ids" not in kw
        assert kw["attention_mask"].shape == (1, 4 + 4)
        _, kw = inj(ours.backbone, (), {"input_ids": ids, name: DynamicCache()})
        assert kw["inputs_embeds"].shape == (1, 4 + 1, ours.dim) and "input_ids" not in kw
    assert inj.prefills == 2


def test_generate_refuses_right_padding():
    ours, _ = build_pair("llama", CFG)
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(**batch("llama", pad="right"), max_new_tokens=2)


def test_without_cache_the_prompt_enters_every_step():
    ours, _ = build_pair("gpt2", CFG)
    data = batch("gpt2", b=2, length=6, pad="left", seed=12)
    assert torch.equal(ours.generate(**data, max_new_tokens=6, use_cache=False),
                       ours.generate(**data, max_new_tokens=6))
