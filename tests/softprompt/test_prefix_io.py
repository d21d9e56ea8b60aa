"""Prefix folders: ours -> ours bitwise, peft -> ours and ours -> peft, and clear errors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from softprompt import PrefixConfig, PrefixModel, load_prefix, load_prompt, save_prefix
from tests.softprompt.prefix_pairs import backbone, build_prefix_pair, labels_for, peft_case, ragged_batch

peft = pytest.importorskip("peft")

TOL = dict(atol=1e-6, rtol=1e-6)  # a live projection MLP (run on the batch) vs its saved output
CASES = [("llama", True, "causal_lm"), ("gpt2", False, "causal_lm"), ("qwen2", True, "causal_lm"),
         ("mistral", False, "causal_lm"), ("bert", True, "seq_cls"), ("llama", False, "seq_cls")]
PEFT_CASES = [pytest.param(*case, marks=peft_case(case[2])) for case in CASES]


def _trained(family: str, projection: bool, task: str) -> PrefixModel:
    """A model whose prefixes and head moved away from their init (one AdamW step)."""
    torch.manual_seed(0)
    pm = PrefixModel(backbone(family, task), PrefixConfig(n_virtual=3, projection=projection), task=task)
    opt = torch.optim.AdamW(pm.adapter_parameters(), lr=1e-2)
    data = ragged_batch()
    pm(**data, labels=labels_for(task, data)).loss.backward()
    opt.step()
    return pm.eval()


def _load_peft(family: str, task: str, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(backbone(family, task), str(folder)).eval()


@pytest.mark.parametrize("family, projection, task", CASES)
def test_save_load_is_bitwise(family, projection, task, tmp_path):
    """Every trained tensor (table, MLP, head copy) and the outputs come back bit for bit; the
    projection's MLP is kept so training resumes from it."""
    pm = _trained(family, projection, task)
    save_prefix(pm, tmp_path)
    back = load_prefix(backbone(family, task), tmp_path)
    assert back.config == pm.config and back.task == task and not back.training
    a, b = dict(pm.named_parameters()), dict(back.named_parameters())
    trained = [n for n, p in a.items() if p.requires_grad]
    assert trained and trained == [n for n, p in b.items() if p.requires_grad]
    for name in trained:
        assert torch.equal(a[name], b[name]), name
    data = ragged_batch()
    with torch.no_grad():
        assert torch.equal(pm(**data).logits, back(**data).logits)


@pytest.mark.parametrize("family, projection, task", PEFT_CASES)
def test_ours_load_in_peft(family, projection, task, tmp_path):
    """peft's from_pretrained reads our folder (the projection baked into prompt_embeddings,
    our extra keys ignored) and gives our logits; greedy decoding agrees too."""
    pm = _trained(family, projection, task)
    save_prefix(pm, tmp_path)
    ref = _load_peft(family, task, tmp_path)
    assert ref.peft_config["default"].peft_type == "PREFIX_TUNING"
    data = ragged_batch()
    with torch.no_grad():
        assert_close(pm(**data).logits, ref(**data).logits, **TOL)


@pytest.mark.parametrize("family, projection, task", PEFT_CASES)
def test_peft_folders_load_here(family, projection, task, tmp_path):
    """A peft-saved folder (projection or not) loads as the fixed table peft itself reloads,
    with the head copy, and gives peft's logits."""
    ref_model = build_prefix_pair(family, PrefixConfig(n_virtual=3, projection=projection), task=task)[1]
    with torch.no_grad():
        for p in ref_model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # away from any init
    ref_model.eval()
    ref_model.save_pretrained(str(tmp_path))
    ours = load_prefix(backbone(family, task), tmp_path)
    assert ours.config == PrefixConfig(n_virtual=3) and ours.task == task
    data = ragged_batch()
    with torch.no_grad():
        assert_close(ours(**data).logits, ref_model(**data).logits, **TOL)
        saved = load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"]
        assert torch.equal(ours.prefix(), saved)


def test_peft_config_fields(tmp_path):
    """adapter_config.json carries peft's PREFIX_TUNING fields; GQA widths are the kv widths."""
    pm = _trained("llama", True, "causal_lm")
    save_prefix(pm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["prefix_projection"] is True
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["token_dim"]) == (2, 2, 8)  # llama: 2 kv heads x 4
    assert cfg["encoder_hidden_size"] == 8 and cfg["num_virtual_tokens"] == 3 and cfg["inference_mode"] is True
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {"prompt_embeddings", "softprompt.prefix_encoder.embedding.weight",
                    "softprompt.prefix_encoder.transform.0.weight", "softprompt.prefix_encoder.transform.0.bias",
                    "softprompt.prefix_encoder.transform.2.weight", "softprompt.prefix_encoder.transform.2.bias"}


def test_folder_of_another_method_is_refused(tmp_path):
    lora_dir, prompt_dir = tmp_path / "lora", tmp_path / "prompt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(backbone("llama", "causal_lm"), peft.LoraConfig(r=2)).save_pretrained(str(lora_dir))
        peft.get_peft_model(backbone("llama", "causal_lm"), peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(str(prompt_dir))
    with pytest.raises(ValueError, match=r"peft_type='LORA'; expected PREFIX_TUNING; load it with lora.load_lora"):
        load_prefix(backbone("llama", "causal_lm"), lora_dir)
    with pytest.raises(ValueError, match=r"peft_type='PROMPT_TUNING'; expected PREFIX_TUNING; load it with "
                                         r"softprompt.load_prompt"):
        load_prefix(backbone("llama", "causal_lm"), prompt_dir)
    save_prefix(_trained("gpt2", False, "causal_lm"), tmp_path / "prefix")
    with pytest.raises(ValueError, match="peft_type='PREFIX_TUNING'"):
        load_prompt(backbone("gpt2", "causal_lm"), tmp_path / "prefix")
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        load_prefix(backbone("gpt2", "causal_lm"), tmp_path / "nothing")


def test_folder_of_another_model_is_refused(tmp_path):
    """A llama prefix (2 kv heads x 4) on gpt2 (4 heads x 4): the config fields name the mismatch."""
    save_prefix(_trained("llama", False, "causal_lm"), tmp_path)
    with pytest.raises(ValueError, match=r"num_attention_heads=2 but the backbone has 4"):
        load_prefix(backbone("gpt2", "causal_lm"), tmp_path)


def test_wrong_shapes_and_values_are_named(tmp_path):
    pm = _trained("bert", False, "seq_cls")
    save_prefix(pm, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "prompt_embeddings": state["prompt_embeddings"][:, :-1].contiguous()}, str(weights))
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(3, 63\); expected \(3, 64\)"):
        load_prefix(backbone("bert", "seq_cls"), tmp_path)
    save_file({**state, "base_model.classifier.weight": torch.zeros(2, 16)}, str(weights))
    with pytest.raises(ValueError, match=r"base_model.classifier.weight: file \(2, 16\) vs model \(3, 16\)"):
        load_prefix(backbone("bert", "seq_cls"), tmp_path)
    save_file({k: v for k, v in state.items() if k != "base_model.classifier.bias"}, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \['base_model.classifier.bias'\]"):
        load_prefix(backbone("bert", "seq_cls"), tmp_path)
    bad = state["prompt_embeddings"].clone()
    bad[0, 0] = float("nan")
    save_file({**state, "prompt_embeddings": bad}, str(weights))
    with pytest.raises(ValueError, match="prompt_embeddings is torch.float32 with non-finite"):
        load_prefix(backbone("bert", "seq_cls"), tmp_path)


def test_projection_folder_without_encoder_keys_is_refused(tmp_path):
    save_prefix(_trained("llama", True, "causal_lm"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(str(weights))
    save_file({"prompt_embeddings": state["prompt_embeddings"]}, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \['softprompt.prefix_encoder.embedding.weight'"):
        load_prefix(backbone("llama", "causal_lm"), tmp_path)
