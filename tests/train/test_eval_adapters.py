"""Answer-word accuracy against a per-example reference; adapters save -> load per method."""
from __future__ import annotations

import pytest
import torch

from tests.models import tiny_bert_classifier, tiny_causal_lm, tiny_tokenizer
from tests.train.helpers import ToyAdapter
from train.adapters import adapter_bytes, build_adapted, count_trainable, load_adapted, save_adapted
from train.config import ModelConfig
from train.data import classification_to_instruction, encode_instruction
from train.evaluate import answer_accuracy, answer_token_ids


def _examples():
    tok = tiny_tokenizer()
    recs = [{"text": "great movie " * (i % 4) + "hello", "label": i % 2} for i in range(10)]
    recs = classification_to_instruction(recs, "Is the sentiment positive or negative?", ("negative", "positive"))
    return tok, [dict(encode_instruction(tok, r, 64), label=r["label"]) for r in recs]


@pytest.mark.parametrize("wrap", [False, True])
def test_answer_accuracy_matches_one_prompt_at_a_time(wrap):
    tok, examples = _examples()
    model = tiny_causal_lm("llama")
    model = ToyAdapter(model, dropout=0.0) if wrap else model  # True: no logits_to_keep fast path
    ids = answer_token_ids(tok, ("negative", "positive"))
    with torch.no_grad():
        expected = 0
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"][:e["prompt_len"]]])).logits[0, -1]
            expected += int(int(logits[ids].argmax()) == e["label"])
    got = answer_accuracy(model, examples, ids, tok.pad_token_id, torch.device("cpu"), batch_size=4)
    assert got["accuracy"] == expected / len(examples)
    assert 0 < expected < len(examples)  # a random model gets some right and some wrong


@pytest.mark.parametrize("method", ["head", "prompt", "ptuning", "prefix", "lora", "qlora"])
def test_adapter_save_load_round_trip(tmp_path, method):
    knobs = {"prompt": {"n_virtual": 4}, "ptuning": {"n_virtual": 4}, "prefix": {"n_virtual": 4}, "head": {},
             "lora": {"lora_r": 2, "target_modules": ("query", "value")}}
    cfg = ModelConfig(method=method, **knobs.get(method, knobs["lora"]))
    torch.manual_seed(0)
    model = build_adapted(tiny_bert_classifier(num_labels=2), cfg, "seq_cls", tiny_tokenizer())
    assert 0 < count_trainable(model) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # move the trainable tensors off their init so the round trip means something
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapted(model, method, tmp_path)
    assert adapter_bytes(tmp_path) > 0
    loaded = load_adapted(tiny_bert_classifier(num_labels=2), method, tmp_path)
    batch = {"input_ids": torch.tensor([[1, 5, 9, 12, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_unknown_method_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="method='bitfit'"):
        ModelConfig(method="bitfit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapted(tiny_bert_classifier(), "lora", tmp_path / "none")
    with pytest.raises(ValueError, match="needs task=classify"):
        build_adapted(tiny_causal_lm("llama"), ModelConfig(method="head"), "causal_lm")


def test_prompt_pool_option_reaches_the_prompt_model():
    from softprompt import PromptModel
    batch = {"input_ids": torch.tensor([[1, 5, 9, 12, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    outs = {}
    for pool in ("backbone", "real_cls"):
        torch.manual_seed(0)
        model = build_adapted(tiny_bert_classifier(num_labels=2), ModelConfig(method="ptuning", n_virtual=4,
                                                                             prompt_pool=pool), "seq_cls")
        assert isinstance(model, PromptModel) and model.config.pool == pool
        with torch.no_grad():
            outs[pool] = model.eval()(**batch).logits
    assert not torch.allclose(outs["backbone"], outs["real_cls"])  # a different position is pooled
    with pytest.raises(ValueError, match="prompt_pool='last'"):
        ModelConfig(prompt_pool="last")
