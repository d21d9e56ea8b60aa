"""Table-driven faults through ``python -m train`` (in-process ``main(argv)``).

Each case sets up a bad input under ``tmp_path`` and expects exit status 2 with ONE stderr line
``error: ...`` that matches the case's pattern (which names the bad value, field or file), and
that no file under ``tmp_path`` or the shared model/data folders was written, changed or removed.
The class column says which kind of fault from the hardening list a case covers:
``out`` (--out), ``device``, ``config`` (JSON config types), ``data`` (data files), ``length``
(--max-length / positions), ``batch``, ``option`` (an option the method ignores), ``resume``,
``adapter`` (corrupt adapter given to eval/predict/generate), ``run`` (corrupt run folder), ``value``
(a bad flag value).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_folders import build_folders, copy_run, snapshot, train_argv
from train.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_folders(tmp_path_factory.mktemp("bad-cli"))


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    """Finished runs to corrupt: LoRA on the causal LM, prompt tuning and head on the classifier."""
    root = tmp_path_factory.mktemp("bad-cli-runs")
    bert = ["--model", str(folders / "tiny-bert"), "--data", str(folders / "reviews.csv")]
    argvs = {"lora": train_argv(root / "lora", "--model", str(folders / "tiny-llama"), "--data",
                                str(folders / "chat.jsonl"), "--max-length", "32", "--method", "lora"),
             "prompt": train_argv(root / "prompt", *bert, "--method", "prompt", "--n-virtual", "4"),
             "head": train_argv(root / "head", *bert, "--method", "head")}
    for argv in argvs.values():
        assert main(argv) == 0
    return root


def _bert(f):
    return ["--model", str(f / "tiny-bert"), "--data", str(f / "reviews.csv")]


def _chat(f):
    return ["--model", str(f / "tiny-llama"), "--data", str(f / "chat.jsonl"), "--max-length", "32"]


def _config(t, content) -> Path:
    path = t / "c.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _with_config(content):
    return lambda t, f, r: train_argv(t / "run", *_bert(f), "--config", str(_config(t, content)))


def _data_file(name, content: bytes, *extra):
    def setup(t, f, r):
        (t / name).write_bytes(content)
        return train_argv(t / "run", "--model", str(f / "tiny-bert"), "--data", str(t / name), *extra)
    return setup


def _flags(*flags, base=_bert):
    return lambda t, f, r: train_argv(t / "run", *base(f), *flags)


def _out_file(t, f, r):
    (t / "out.txt").write_text("x")
    return train_argv(t / "out.txt", *_bert(f))


def _out_under_file(t, f, r):
    (t / "f.txt").write_text("x")
    return train_argv(t / "f.txt" / "run", *_bert(f))


def _out_busy(t, f, r):
    (t / "run").mkdir()
    (t / "run" / "notes.txt").write_text("mine")
    return train_argv(t / "run", *_bert(f))


def _resume_empty(t, f, r):
    (t / "run").mkdir()
    return train_argv(t / "run", *_bert(f), "--resume")


def _bad_model_config(t, f, r):
    shutil.copytree(f / "tiny-bert", t / "model")
    (t / "model" / "config.json").write_text("{")
    return train_argv(t / "run", "--model", str(t / "model"), "--data", str(f / "reviews.csv"))


def _run(kind, command, corrupt, *extra):
    """eval/predict/generate on a private copy of a finished run after ``corrupt(run_copy)``."""
    def setup(t, f, r):
        run = copy_run(r / kind, t / kind)
        corrupt(run)
        texts = ["Say hello"] if command != "eval" else []
        return [command, str(run), *texts, *extra]
    return setup


def _truncate(name):
    def corrupt(run):
        path = run / "adapter" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return corrupt


def _write(name, text):
    return lambda run: (run / name).write_text(text)


def _edit_json(name, **changes):
    def corrupt(run):
        raw = json.loads((run / name).read_text())
        raw.update(changes)
        (run / name).write_text(json.dumps(raw))
    return corrupt


def _edit_loop(**changes):
    def corrupt(run):
        raw = json.loads((run / "config.json").read_text())
        raw["loop"].update(changes)
        (run / "config.json").write_text(json.dumps(raw))
    return corrupt


def _tensors(name, edit):
    def corrupt(run):
        path = run / "adapter" / name
        tensors = load_file(path)
        save_file(edit(tensors), path)
    return corrupt


def _nan(tensors):
    return {k: torch.full_like(v, math.nan) for k, v in tensors.items()}


def _drop(key):
    return lambda tensors: {k: v for k, v in tensors.items() if k != key}


W, C, P = "adapter_model.safetensors", "adapter_config.json", "softprompt_config.json"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
LATIN1 = "text,label\n".encode() + "".join(f"caf\xe9 {i},{i % 2}\n" for i in range(20)).encode("latin-1")

# (id, class, setup(tmp, folders, runs) -> argv, pattern the one error line must match)
CASES = [
    ("out-is-a-file", "out", _out_file, r"out\.txt is a file"),
    ("out-under-a-file", "out", _out_under_file, r"f\.txt is a file, not a folder"),
    ("out-not-writable", "out", lambda t, f, r: train_argv(Path("/proc/purepeft-never/run"), *_bert(f)),
     r"--out /proc/purepeft-never/run: .*(not writable|cannot create)"),
    ("out-not-empty", "out", _out_busy, r"run folder .*run is not empty"),
    ("device-cuda", "device", _flags("--device", "cuda"), r"--device cuda: CUDA is not available"),
    ("device-cuda-index", "device", _flags("--device", "cuda:3"), r"--device cuda:3: CUDA is not available"),
    ("device-name", "device", _flags("--device", "gpu"), r"device='gpu'; expected auto, cpu"),
    ("config-int-as-string", "config", _with_config({"model": {"lora_r": "8"}}), r"c\.json: lora_r='8' \(str\)"),
    ("config-section-int", "config", _with_config({"loop": 5}), r"c\.json: config section 'loop' is 5"),
    ("config-float-steps", "config", _with_config({"loop": {"steps": 3.5}}), r"c\.json: steps=3\.5"),
    ("config-bool-as-string", "config", _with_config({"loop": {"progress": "yes"}}), r"progress='yes'"),
    ("config-bool-as-int", "config", _with_config({"loop": {"grad_checkpointing": 1}}), r"grad_checkpointing=1"),
    ("config-list-as-string", "config", _with_config({"model": {"target_modules": "q_proj"}}),
     r"target_modules='q_proj'"),
    ("config-list-of-ints", "config", _with_config({"data": {"label_words": [0, 1]}}), r"label_words=\[0, 1\]"),
    ("config-null", "config", _with_config({"data": {"max_length": None}}), r"max_length=None"),
    ("config-lr-string", "config", _with_config({"loop": {"lr": "1e-3"}}), r"lr='1e-3'"),
    ("config-top-level-list", "config", _with_config([1, 2]), r"c\.json: expected a JSON object"),
    ("config-bad-json", "config", _with_config("{"), r"c\.json: not valid JSON"),
    ("config-unknown-section", "config", _with_config({"optim": {}}), r"unknown config section\(s\) \['optim'\]"),
    ("config-unknown-field", "config", _with_config({"loop": {"stepz": 3}}), r"unknown field\(s\) \['stepz'\]"),
    ("config-missing-file", "config",
     lambda t, f, r: train_argv(t / "run", *_bert(f), "--config", str(t / "none.json")), r"none\.json: no such file"),
    ("data-latin1-csv", "data", _data_file("latin1.csv", LATIN1), r"latin1\.csv:2: byte b'\\xe9' at offset 14 is not UTF-8"),
    ("data-latin1-jsonl", "data",
     _data_file("latin1.jsonl", '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")), r"latin1\.jsonl:1: byte .* is not UTF-8"),
    ("data-missing-column", "data", _data_file("nocol.csv", b"sentence,label\na,1\n"), r"nocol\.csv: missing column\(s\) \['text'\]"),
    ("data-label-not-int", "data", _data_file("lab.csv", b"text,label\na,x\n"), r"lab\.csv:2: label 'x' is not an integer"),
    ("data-label-range", "data", _data_file("rng.csv", b"text,label\na,5\n"), r"rng\.csv:2: label 5 is outside"),
    ("data-jsonl-bad-line", "data", _data_file("bad.jsonl", b'{"instruction": "a", "output": "b"}\n{oops\n'),
     r"bad\.jsonl:2: not valid JSON"),
    ("data-jsonl-missing-field", "data", _data_file("miss.jsonl", b'{"instruction": "a"}\n'),
     r"miss\.jsonl: record 0 lacks string field\(s\) \['output'\]"),
    ("data-unknown-suffix", "data", _data_file("d.txt", b"hello\n"), r"d\.txt: unknown suffix '\.txt'"),
    ("data-no-records", "data", _data_file("empty.csv", b"text,label\n"), r"empty\.csv: the file holds no records"),
    ("data-missing", "data", _flags("--data", "/nonexistent/d.csv"), r"'/nonexistent/d\.csv' is neither a bundled"),
    ("model-missing", "data", _flags("--model", "/nonexistent/m"), r"'/nonexistent/m' is neither a bundled"),
    ("model-bad-config", "data", _bad_model_config, r"model/config\.json is not valid JSON"),
    ("length-beyond-positions", "length", _flags("--data", "LONG", "--max-length", "200"),
     r"max_length=200: the longest example has \d+ tokens, beyond the model's 64 positions"),
    ("length-virtual-beyond", "length", _flags("--method", "prompt", "--n-virtual", "60"),
     r"\+ 60 virtual tokens, beyond the model's 64 positions .*config\.json"),
    ("batch-larger-than-data", "batch", _flags("--batch-size", "100"),
     r"batch_size=100 is larger than the 16 training examples"),
    ("option-lora-r-on-ptuning", "option", _flags("--method", "ptuning", "--lora-r", "4"),
     r"lora_r=4 is only used by method lora or qlora; method 'ptuning' would ignore it"),
    ("option-n-virtual-on-lora", "option", _flags("--method", "lora", "--n-virtual", "4"), r"n_virtual=4 is only used"),
    ("option-encoder-on-head", "option", _flags("--method", "head", "--encoder", "lstm"), r"encoder='lstm' is only used"),
    ("option-targets-on-prompt", "option", _flags("--method", "prompt", "--target-modules", "query"),
     r"target_modules=\('query',\) is only used"),
    ("option-init-text-without-text", "option", _flags("--method", "prompt", "--prompt-init-text", "hi"),
     r"prompt_init_text='hi' is only used with prompt_init='text'"),
    ("option-text-init-without-text", "option", _flags("--method", "prompt", "--prompt-init", "text"),
     r"prompt_init='text' needs a non-empty prompt_init_text"),
    ("option-pool-on-causal", "option", _flags("--method", "prompt", "--prompt-pool", "real_cls", base=_chat),
     r"prompt_pool='real_cls' chooses a classifier's pooling"),
    ("option-head-on-instruct", "option", _flags("--method", "head", base=_chat), r"method 'head' trains a classification head"),
    ("resume-no-checkpoint", "resume", _resume_empty, r"--resume: no complete checkpoint under .*checkpoints"),
    ("resume-without-out", "resume",
     lambda t, f, r: ["train", "--resume", "--no-progress", *_bert(f)], r"--resume needs --out"),
    ("value-method", "value", _flags("--method", "adapterx"), r"method='adapterx'; expected one of"),
    ("value-lr-nan", "value", _flags("--lr", "nan"), r"lr=nan; expected a positive finite"),
    ("value-lr-zero", "value", _flags("--lr", "0"), r"lr=0\.0; expected a positive finite"),
    ("value-warmup", "value", _flags("--warmup-steps", "50"), r"warmup_steps=50; expected in \[0, steps=3\]"),
    ("value-dropout", "value", _flags("--lora-dropout", "1.0"), r"lora_dropout=1\.0; expected in \[0, 1\)"),
    ("value-eval-fraction", "value", _flags("--eval-fraction", "0"), r"eval_fraction=0\.0"),
    ("value-num-labels", "value", _flags("--num-labels", "1"), r"num_labels=1; expected >= 2"),
    ("value-label-words", "value", _flags("--label-words", "a"), r"label_words=\('a',\); expected 2 words"),
    ("value-task", "value", _flags("--task", "foo"), r"task='foo'"),
    ("value-grad-accum", "value", _flags("--grad-accum", "0"), r"grad_accum=0; expected an integer > 0"),
    ("value-batch-zero", "value", _flags("--batch-size", "0"), r"batch_size=0; expected an integer > 0"),
    ("value-base-dtype", "value", _flags("--base-dtype", "fp8"), r"base_dtype='fp8'"),
    ("value-n-virtual-zero", "value", _flags("--method", "prompt", "--n-virtual", "0"), r"n_virtual=0; expected > 0"),
    ("value-schedule", "value", _flags("--schedule", "step"), r"schedule='step'"),
    ("adapter-lora-truncated", "adapter", _run("lora", "eval", _truncate(W)),
     r"lora/adapter/adapter_model\.safetensors is not a readable safetensors file"),
    ("adapter-lora-bad-json", "adapter", _run("lora", "predict", _write(f"adapter/{C}", "{")),
     r"lora/adapter/adapter_config\.json is not valid JSON"),
    ("adapter-lora-bool-string", "adapter", _run("lora", "generate", _edit_json(f"adapter/{C}", use_rslora="false")),
     r"adapter_config\.json: wrong value type\(s\): use_rslora='false' \(a JSON string, expected boolean\)"),
    ("adapter-lora-dora-no", "adapter", _run("lora", "eval", _edit_json(f"adapter/{C}", use_dora="no")), r"use_dora='no'"),
    ("adapter-lora-r-string", "adapter", _run("lora", "generate", _edit_json(f"adapter/{C}", r="8")),
     r"adapter_config\.json: wrong value type\(s\): r='8'"),
    ("adapter-lora-alpha-bool", "adapter", _run("lora", "eval", _edit_json(f"adapter/{C}", lora_alpha=True)),
     r"lora_alpha=True \(a JSON boolean"),
    ("adapter-lora-nan", "adapter", _run("lora", "eval", _tensors(W, _nan)),
     r"adapter_model\.safetensors: tensor\(s\) .* hold NaN or infinite values"),
    ("adapter-prompt-truncated", "adapter", _run("prompt", "predict", _truncate(W)),
     r"prompt/adapter/adapter_model\.safetensors is not a readable safetensors file"),
    ("adapter-prompt-missing-key", "adapter", _run("prompt", "eval", _write(f"adapter/{P}", '{"config": {}}')),
     r"softprompt_config\.json: missing or malformed key\(s\) \['task'\]"),
    ("adapter-prompt-bad-json", "adapter", _run("prompt", "eval", _write(f"adapter/{C}", "[1,")),
     r"prompt/adapter/adapter_config\.json is not valid JSON"),
    ("adapter-prompt-nan", "adapter", _run("prompt", "eval", _tensors(W, _nan)), r"hold NaN or infinite values"),
    ("adapter-prompt-no-embeddings", "adapter", _run("prompt", "eval", _tensors(W, _drop("prompt_embeddings"))),
     r"adapter_model\.safetensors: missing key 'prompt_embeddings'"),
    ("adapter-prompt-n-virtual-string", "adapter",
     _run("prompt", "eval", _edit_json(f"adapter/{C}", num_virtual_tokens="4")), r"num_virtual_tokens='4'"),
    ("adapter-head-bad-json", "adapter", _run("head", "eval", _write("adapter/head_config.json", "{")),
     r"head/adapter/head_config\.json is not valid JSON"),
    ("adapter-head-truncated", "adapter", _run("head", "predict", _truncate("head_model.safetensors")),
     r"head_model\.safetensors is not a readable safetensors file"),
    ("adapter-missing", "adapter", _run("head", "eval", lambda run: shutil.rmtree(run / "adapter")),
     r"head is not a finished run folder"),
    ("run-config-missing", "run", _run("head", "eval", lambda run: (run / "config.json").unlink()),
     r"is not a finished run folder \(needs config\.json and adapter/\)"),
    ("run-config-corrupt", "run", _run("head", "eval", _write("config.json", "{")), r"head/config\.json: "),
    ("run-config-wrong-type", "run", _run("head", "eval", _edit_loop(steps="3")), r"head/config\.json: steps='3'"),
    ("generate-beyond-positions", "length", _run("lora", "generate", lambda run: None, "--max-new-tokens", "100"),
     r"--max-new-tokens 100: with the \d+ prompt tokens this exceeds the model's 64 positions"),
    ("generate-zero-tokens", "value", _run("lora", "predict", lambda run: None, "--max-new-tokens", "0"),
     r"--max-new-tokens 0; expected >= 1"),
    ("run-missing", "run", lambda t, f, r: ["eval", str(t / "nowhere")], r"nowhere is not a finished run folder"),
]
CASES = [pytest.param(*c, id=c[0], marks=[NO_CUDA] if c[1] == "device" and "cuda" in c[0] else [])
         for c in CASES]


@pytest.mark.parametrize("name,kind,setup,pattern", CASES)
def test_bad_input_is_one_clear_error_and_writes_nothing(folders, runs, tmp_path, capsys, name, kind, setup, pattern):
    argv = setup(tmp_path, folders, runs)
    argv = [str(folders / "long.csv") if a == "LONG" else a for a in argv]
    before = snapshot(tmp_path, folders)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(tmp_path, folders) == before, "a refused command changed files"
