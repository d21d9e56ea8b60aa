"""save_prompt / load_prompt: bitwise round trip, both directions with peft, training resume."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.testing import assert_close

from softprompt import PromptConfig, PromptModel, load_prompt, save_prompt
from softprompt.io import adapter_state_dict
from tests.models import tiny_causal_lm, tiny_tokenizer
from tests.softprompt.pairs import INIT_TEXT, batch, build_backbone, build_pair, causal_labels, peft

TOL = dict(atol=1e-6, rtol=1e-6)
CASES = {
    "prompt_causal": (PromptConfig(method="prompt", n_virtual=4), "llama", "causal_lm"),
    "mlp_causal": (PromptConfig(method="ptuning", n_virtual=4, encoder="mlp"), "gpt2", "causal_lm"),
    "lstm_causal": (PromptConfig(method="ptuning", n_virtual=4, encoder="lstm", encoder_dropout=0.2,
                                 encoder_num_layers=2), "qwen2", "causal_lm"),
    "prompt_bert_cls": (PromptConfig(method="prompt", n_virtual=4), "bert", "seq_cls"),
    "mlp_llama_cls": (PromptConfig(method="ptuning", n_virtual=4), "llama", "seq_cls"),
}


def _trained(family, cfg, task, steps=2):
    """A model whose prompt (and head) moved away from the init, so round trips are not vacuous."""
    pm = PromptModel(build_backbone(family, task), cfg, task=task)
    opt = torch.optim.AdamW(pm.adapter_parameters(), lr=5e-2)
    pm.train()
    for step in range(steps):
        data = batch(family, pad="left", seed=step)
        labels = causal_labels(data) if task == "causal_lm" else torch.tensor([0, 1, 2])
        opt.zero_grad()
        pm(**data, labels=labels).loss.backward()
        opt.step()
    return pm.eval()


def _logits(model, family):
    data = batch(family, pad="left", seed=42)
    with torch.no_grad():
        return model(**data).logits


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_bitwise(case, tmp_path):
    cfg, family, task = CASES[case]
    pm = _trained(family, cfg, task)
    save_prompt(pm, tmp_path)
    loaded = load_prompt(build_backbone(family, task), tmp_path)
    assert loaded.config == cfg and loaded.task == task
    for (n1, p1), (n2, p2) in zip(pm.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
        assert p1.requires_grad == p2.requires_grad
    assert torch.equal(_logits(pm, family), _logits(loaded, family))
    # what peft reads: the prompt in eval mode, fp32; no temp files left behind
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert state["prompt_embeddings"].dtype == torch.float32
    assert torch.equal(state["prompt_embeddings"], pm.prompt().detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "softprompt_config.json"]


def test_saved_prompt_is_eval_mode_output(tmp_path):
    """An LSTM with dropout saved in train mode still writes the dropout-free prompt."""
    cfg, family, task = CASES["lstm_causal"]
    pm = _trained(family, cfg, task).train()
    first = adapter_state_dict(pm)["prompt_embeddings"]
    assert torch.equal(first, adapter_state_dict(pm)["prompt_embeddings"])
    assert pm.prompt_encoder.training  # the mode is given back
    assert torch.equal(first, pm.eval().prompt().detach())


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_ours(case, tmp_path):
    cfg, family, task = CASES[case]
    pm = _trained(family, cfg, task)
    save_prompt(pm, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(build_backbone(family, task), str(tmp_path))
    assert_close(_logits(ref, family), _logits(pm, family), **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_ours_loads_peft(case, tmp_path):
    cfg, family, task = CASES[case]
    _, ref = build_pair(family, cfg, task=task)
    with torch.no_grad():  # move the head copy off the backbone's head so loading it matters
        for name, p in ref.named_parameters():
            if "modules_to_save.default" in name:
                p.add_(0.5)
    ref.eval()  # peft saves the encoder output in the current mode (LSTM dropout)
    ref.save_pretrained(str(tmp_path))
    loaded = load_prompt(build_backbone(family, task), tmp_path)
    assert loaded.config.method == "prompt"  # peft keeps only the encoder output
    assert_close(_logits(loaded, family), _logits(ref, family), **TOL)


def test_ptuning_resume_same_next_loss(tmp_path):
    """Stop a P-Tuning run after 3 steps, save, reload into a fresh backbone: the encoder trains
    on, and the next step's loss and gradients equal the uninterrupted run's."""
    cfg = PromptConfig(method="ptuning", n_virtual=4, encoder="lstm")
    pm = _trained("llama", cfg, "causal_lm", steps=3)
    save_prompt(pm, tmp_path)
    resumed = load_prompt(tiny_causal_lm("llama"), tmp_path)
    assert len(resumed.adapter_parameters()) == len(pm.adapter_parameters())
    assert all(p.requires_grad for p in resumed.adapter_parameters())
    data = batch("llama", pad="left", seed=3)
    labels = causal_labels(data)
    for p in pm.adapter_parameters():
        p.grad = None
    losses = []
    for model in (pm.train(), resumed.train()):
        loss = model(**data, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for p, q in zip(pm.adapter_parameters(), resumed.adapter_parameters()):
        assert torch.equal(p.grad, q.grad)


def test_peft_config_fields(tmp_path):
    pm = PromptModel(tiny_causal_lm("gpt2"), PromptConfig(method="ptuning", n_virtual=3, encoder="lstm"))
    save_prompt(pm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "P_TUNING" and cfg["inference_mode"] is True
    assert cfg["encoder_reparameterization_type"] == "LSTM" and cfg["encoder_hidden_size"] == 16
    assert cfg["num_virtual_tokens"] == 3 and cfg["token_dim"] == 16 and cfg["task_type"] == "CAUSAL_LM"
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert loaded.num_virtual_tokens == 3 and loaded.peft_type == peft.PeftType.P_TUNING


def test_text_init_round_trips_through_peft(tmp_path):
    """A text-initialised prompt records peft's TEXT init with the tokenizer's path; peft loads it."""
    tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    cfg = PromptConfig(n_virtual=5, init="text", init_text=INIT_TEXT)
    pm = PromptModel(tiny_causal_lm("llama"), cfg, tokenizer=tokenizer)
    save_prompt(pm, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["prompt_tuning_init"] == "TEXT" and saved["tokenizer_name_or_path"] == str(tmp_path / "tok")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(tiny_causal_lm("llama"), str(tmp_path / "adapter"))
    assert_close(_logits(ref, "llama"), _logits(pm.eval(), "llama"), **TOL)
    assert load_prompt(tiny_causal_lm("llama"), tmp_path / "adapter").config == cfg


def test_load_refuses_wrong_hidden_size(tmp_path):
    pm = PromptModel(tiny_causal_lm("llama"), PromptConfig(n_virtual=3))
    save_prompt(pm, tmp_path)
    config = tiny_causal_lm("llama").config
    config.hidden_size, config.head_dim = 32, 8
    other = type(tiny_causal_lm("llama"))(config)
    with pytest.raises(ValueError, match="token_dim=16 but the backbone's embedding width is 32"):
        load_prompt(other, tmp_path)


def test_load_names_bad_keys(tmp_path):
    pm = PromptModel(tiny_causal_lm("llama"), PromptConfig(method="ptuning", n_virtual=3))
    save_prompt(pm, tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    state.pop("softprompt.encoder.mlp_head.0.bias")
    state["softprompt.encoder.extra"] = torch.zeros(1)
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['softprompt.encoder.mlp_head.0.bias'\], "
                                         r"unexpected keys \['softprompt.encoder.extra'\]"):
        load_prompt(tiny_causal_lm("llama"), tmp_path)
