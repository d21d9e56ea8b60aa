"""The ``bottleneck`` method through train.adapters and ``python -m train`` (a short CLI run)."""
from __future__ import annotations

import json

import pytest
import torch

from lora.bottleneck_inject import adapter_sites
from tests.models import tiny_bert_classifier, tiny_causal_lm, tiny_tokenizer
from train import ModelConfig, build_adapted, load_adapted, save_adapted
from train.cli import main


@pytest.mark.parametrize("preset, per_layer", [("pfeiffer", 1), ("houlsby", 2)])
def test_build_save_load_classifier(tmp_path, preset, per_layer):
    cfg = ModelConfig(method="bottleneck", adapter_config=preset, reduction_factor=4, non_linearity="gelu")
    model = build_adapted(tiny_bert_classifier(num_labels=2), cfg, "seq_cls")
    sites = adapter_sites(model)
    assert len(sites) == 2 * per_layer and all(m.config.non_linearity == "gelu" for m in sites.values())
    head = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier.")}
    assert head == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    folder = save_adapted(model, "bottleneck", tmp_path / "adapter")
    assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors", "adapter_config.json",
                                                   "head_model.safetensors", "head_config.json"}
    again = load_adapted(tiny_bert_classifier(num_labels=2), "bottleneck", folder)
    batch = {"input_ids": torch.tensor([[1, 5, 9, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_causal_lm_has_no_head_files(tmp_path):
    model = build_adapted(tiny_causal_lm("llama"), ModelConfig(method="bottleneck", reduction_factor=4), "causal_lm")
    assert all(n.split(".")[-2] in ("adapter_down", "adapter_up") for n, p in model.named_parameters() if p.requires_grad)
    folder = save_adapted(model, "bottleneck", tmp_path / "a")
    assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    assert json.loads((folder / "adapter_config.json").read_text())["config"]["reduction_factor"] == 4


def test_bad_knobs():
    with pytest.raises(ValueError, match="adapter_config='double'"):
        ModelConfig(method="bottleneck", adapter_config="double")
    with pytest.raises(ValueError, match="reduction_factor=0"):
        ModelConfig(method="bottleneck", reduction_factor=0)
    with pytest.raises(ValueError, match="non_linearity='nope'"):
        build_adapted(tiny_causal_lm("llama"), ModelConfig(method="bottleneck", non_linearity="nope"), "causal_lm")
    with pytest.raises(ValueError, match="unsupported architecture model_type='bloom'"):
        build_adapted(tiny_causal_lm("bloom"), ModelConfig(method="bottleneck"), "causal_lm")


def test_cli_train_then_eval(tmp_path, capsys):
    bert = tmp_path / "tiny-bert"
    tiny_bert_classifier(num_labels=2).save_pretrained(bert)
    tiny_tokenizer().save_pretrained(bert)
    texts = ["the movie was great", "a dull , boring film", "wonderful acting", "far too long"]
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f'"{t} {i}",{i % 2}\n' for i, t in enumerate(texts * 5)))
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--batch-size", "2", "--log-every", "1", "--no-progress", "--out", str(out),
                 "--model", str(bert), "--data", str(data), "--method", "bottleneck", "--adapter-config", "houlsby",
                 "--reduction-factor", "4", "--non-linearity", "relu"]) == 0
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert raw["method"] == "bottleneck" and raw["config"]["mh_adapter"] and raw["config"]["non_linearity"] == "relu"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == 4 * (16 * 4 + 4 + 4 * 16 + 16) + (16 * 2 + 2)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "eval_loss" in json.loads(capsys.readouterr().out)
    assert main(["train", "--out", str(tmp_path / "bad"), "--model", str(bert), "--data", str(data),
                 "--method", "bottleneck", "--adapter-config", "double"]) == 2
    assert "adapter_config='double'" in capsys.readouterr().err
