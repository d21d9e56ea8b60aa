"""`python -m train` end to end on tiny local model folders, and its errors on bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.models import tiny_bert_classifier, tiny_causal_lm, tiny_tokenizer
from train.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    llama, bert = root / "tiny-llama", root / "tiny-bert"
    tiny_causal_lm("llama").save_pretrained(llama)
    tiny_bert_classifier(num_labels=2).save_pretrained(bert)
    for folder in (llama, bert):
        tiny_tokenizer().save_pretrained(folder)
    texts = ["the movie was great", "a dull , boring film", "wonderful acting", "far too long"]
    (root / "reviews.csv").write_text("text,label\n" + "".join(f'"{t} {i}",{i % 2}\n' for i, t in enumerate(texts * 5)))
    items = [{"instruction": "Say hello", "input": t, "output": "hello world"} for t in texts * 3]
    (root / "chat.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return root


def _train(folders, out, *flags):
    return main(["train", "--steps", "3", "--batch-size", "2", "--log-every", "1", "--no-progress",
                 "--out", str(out), *flags])


def test_lora_on_a_causal_folder_then_eval_and_generate(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(folders, out, "--model", str(folders / "tiny-llama"), "--data", str(folders / "chat.jsonl"),
                  "--method", "lora", "--max-length", "32") == 0
    for name in ("config.json", "metrics.jsonl", "loss.png", "summary.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "checkpoints/latest.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "causal_lm" and summary["steps"] == 3 and summary["trainable_params"] > 0
    assert len(load_file(out / "adapter" / "adapter_model.safetensors")) > 0
    assert json.loads((out / "config.json").read_text())["model"]["method"] == "lora"
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "eval_loss" in json.loads(capsys.readouterr().out)
    assert main(["generate", str(out), "Say hello", "--max-new-tokens", "3"]) == 0
    assert "Assistant: " in capsys.readouterr().out


def test_prefix_with_projection_on_a_causal_folder_then_generate(folders, tmp_path, capsys):
    out = tmp_path / "prefix"
    assert _train(folders, out, "--model", str(folders / "tiny-llama"), "--data", str(folders / "chat.jsonl"),
                  "--method", "prefix", "--n-virtual", "3", "--prefix-projection", "--encoder-hidden", "12",
                  "--max-length", "32") == 0
    peft_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "PREFIX_TUNING" and peft_cfg["prefix_projection"] is True
    assert peft_cfg["encoder_hidden_size"] == 12 and peft_cfg["num_virtual_tokens"] == 3
    capsys.readouterr()
    assert main(["generate", str(out), "Say hello", "--max-new-tokens", "3"]) == 0
    assert "Assistant: " in capsys.readouterr().out


@pytest.mark.parametrize("method", ["head", "prompt", "ptuning", "prefix", "lora"])
def test_classifier_methods_on_a_csv(folders, tmp_path, capsys, method):
    out = tmp_path / method
    assert _train(folders, out, "--model", str(folders / "tiny-bert"), "--data", str(folders / "reviews.csv"),
                  "--method", method, *(["--n-virtual", "4"] if method in ("prompt", "ptuning") else []),
                  "--lr", "0.01") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "seq_cls" and 0.0 <= summary["after"]["accuracy"] <= 1.0
    capsys.readouterr()
    assert main(["predict", str(out), "what a great movie"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("negative", "positive")


def test_json_config_file_and_flag_priority(folders, tmp_path):
    cfg = {"model": {"method": "head", "model": str(folders / "tiny-bert")},
           "data": {"data": str(folders / "reviews.csv")}, "loop": {"steps": 5, "batch_size": 2, "lr": 0.5}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.json"), "--steps", "2", "--no-progress", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["loop"]["steps"] == 2 and saved["loop"]["lr"] == 0.5 and saved["model"]["method"] == "head"


@pytest.mark.parametrize("flags,match", [
    (["--data", "/nonexistent/data.csv"], r"is neither a bundled name .* nor an existing file"),
    (["--method", "adapterx"], "method='adapterx'; expected one of"),
    (["--method", "lora", "--prefix-projection"], "prefix_projection=True is only used by method prefix"),
    (["--lr", "0"], "lr=0.0; expected a positive finite learning rate"),
    (["--lr=-1e-3"], "lr=-0.001; expected a positive"),
    (["--batch-size", "0"], "batch_size=0; expected an integer > 0"),
    (["--model", "/nonexistent/model"], "neither a bundled name"),
    (["--precision", "fp8"], "precision='fp8'"),
    (["--warmup-steps", "50"], r"warmup_steps=50; expected in \[0, steps=3\]"),
])
def test_bad_inputs_fail_clearly_and_write_nothing(folders, tmp_path, capsys, flags, match):
    out = tmp_path / "never"
    base = ["--model", str(folders / "tiny-bert"), "--data", str(folders / "reviews.csv")]
    assert _train(folders, out, *base, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and __import__("re").search(match, err), err
    assert not out.exists()


def test_bad_config_file_field(folders, tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"loop": {"stepz": 3}}))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "never")]) == 2
    assert "unknown field(s) ['stepz'] in section 'loop'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_non_empty_run_folder_is_refused(folders, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _train(folders, out, "--model", str(folders / "tiny-bert"), "--data", str(folders / "reviews.csv"),
                  "--method", "head") == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_help_lists_generated_flags():
    out = subprocess.run([sys.executable, "-m", "train", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--method", "--lora-r", "--max-length", "--grad-accum", "--precision", "--resume", "--config"):
        assert flag in out
