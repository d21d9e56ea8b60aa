"""Bad inputs fail early with a message that names the value and what was expected."""
from __future__ import annotations

import json

import pytest
import torch

from softprompt import PromptConfig, PromptModel, load_prompt, save_prompt
from tests.models import tiny_causal_lm, tiny_tokenizer
from tests.softprompt.pairs import INIT_TEXT, batch


@pytest.mark.parametrize("n", [0, -3])
def test_n_virtual_must_be_positive(n):
    with pytest.raises(ValueError, match=f"n_virtual={n}; expected a positive int"):
        PromptConfig(n_virtual=n)


def test_init_text_longer_than_n_virtual_needs_consent():
    n_ids = len(tiny_tokenizer()(INIT_TEXT)["input_ids"])
    cfg = PromptConfig(n_virtual=2, init="text", init_text=INIT_TEXT)
    with pytest.raises(ValueError, match=f"gives {n_ids} token ids but n_virtual=2.*truncate_init_text=True"):
        PromptModel(tiny_causal_lm("llama"), cfg, tokenizer=tiny_tokenizer())
    ok = PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=2, init="text", init_text=INIT_TEXT,
                                                           truncate_init_text=True), tokenizer=tiny_tokenizer())
    assert ok.table.weight.shape == (2, 16)


def test_text_init_needs_a_tokenizer():
    with pytest.raises(ValueError, match="init='text' needs a tokenizer"):
        PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=4, init="text", init_text="hello"))


def test_text_init_needs_text():
    with pytest.raises(ValueError, match="init='text' needs a non-empty init_text"):
        PromptConfig(n_virtual=4, init="text")


def test_prompt_plus_input_longer_than_max_positions():
    pm = PromptModel(tiny_causal_lm("gpt2"), PromptConfig(n_virtual=60))  # gpt2 n_positions = 64
    with pytest.raises(ValueError, match="= 67 exceeds the model's maximum of 64 positions"):
        pm(**batch("gpt2", length=7))
    short = PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=40))
    with pytest.raises(ValueError, match="= 66 exceeds the model's maximum of 64"):
        short.generate(batch("llama", length=6, pad="none")["input_ids"], max_new_tokens=20)


def test_mlp_options_peft_would_ignore_are_refused():
    with pytest.raises(ValueError, match="encoder_num_layers=3.*honour_mlp_options=True"):
        PromptConfig(method="ptuning", encoder="mlp", encoder_num_layers=3)
    with pytest.raises(ValueError, match="encoder_dropout=0.1.*honour_mlp_options=True"):
        PromptConfig(method="ptuning", encoder="mlp", encoder_dropout=0.1)


def test_encoder_options_on_prompt_tuning_are_refused():
    with pytest.raises(ValueError, match="only used with method='ptuning'"):
        PromptConfig(method="prompt", encoder="lstm")
    with pytest.raises(ValueError, match="only used with method='ptuning'"):
        PromptConfig(method="prompt", encoder_hidden=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="prefix"), "method='prefix'; expected one of"),
    (dict(init="zeros"), "init='zeros'; expected one of"),
    (dict(method="ptuning", encoder="gru"), "encoder='gru'; expected one of"),
    (dict(method="ptuning", encoder="lstm", encoder_dropout=1.5),
     r"encoder_dropout=1.5; expected a float in \[0, 1\)"),
    (dict(method="ptuning", encoder="lstm", encoder_num_layers=0), "encoder_num_layers=0; expected an int >= 1"),
    (dict(init="ids"), "init='ids' needs a non-empty tuple"),
    (dict(init_text="hi"), "only used with init='text'"),
    (dict(pool="mean"), "pool='mean'; expected one of"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptConfig(**kwargs)


def test_init_ids_out_of_vocab():
    with pytest.raises(ValueError, match="init_ids contain 9999; expected ids < vocab size 512"):
        PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=2, init="ids", init_ids=(3, 9999)))


def test_bad_task_and_missing_head():
    with pytest.raises(ValueError, match="task='tagging'; expected one of"):
        PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=2), task="tagging")
    with pytest.raises(ValueError, match="needs a child module named like"):
        PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=2), task="seq_cls")


def test_load_refuses_other_adapter_types(tmp_path):
    pm = PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=2))
    save_prompt(pm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["peft_type"] = "LORA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="peft_type='LORA'; expected PROMPT_TUNING or P_TUNING"):
        load_prompt(tiny_causal_lm("llama"), tmp_path)


def test_load_refuses_wrong_prompt_shape(tmp_path):
    pm = PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=2))
    save_prompt(pm, tmp_path)
    meta = json.loads((tmp_path / "softprompt_config.json").read_text())
    meta["config"]["n_virtual"] = 5
    (tmp_path / "softprompt_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(2, 16\); expected \(5, 16\)"):
        load_prompt(tiny_causal_lm("llama"), tmp_path)


def test_forward_needs_inputs():
    pm = PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=2))
    with pytest.raises(ValueError, match="give input_ids or inputs_embeds"):
        pm(attention_mask=torch.ones(1, 3))
