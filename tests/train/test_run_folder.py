"""The run folder under faults: one run at a time, refused resumes, crashes, torn files, full disks.

Covers: the exclusive lock (two real CLI processes into one folder), resume validation per
field group (nothing in the folder changes when refused), a crash then ``--resume`` giving the
same bytes as an uninterrupted run (metrics windows and "before" metrics included) even with
a corrupt ``latest.json``, a torn metrics line and orphan temp folders, a full disk during a
checkpoint, file modes, and the model name recorded in adapter configs.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_folders import build_folders, snapshot, train_argv
from tests.models import tiny_bert_classifier
from train.atomic import default_dir_mode, default_mode
from train.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_folders(tmp_path_factory.mktemp("run-folder"))


def _private(folders, tmp_path):
    """Copies of the model and data this test may change in place."""
    shutil.copytree(folders / "tiny-bert", tmp_path / "model")
    shutil.copy(folders / "reviews.csv", tmp_path / "data.csv")
    return ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.csv")]


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def test_second_run_into_a_busy_folder_is_refused_and_the_first_completes(folders, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", str(folders / "tiny-bert"), "--data", str(folders / "reviews.csv"), "--method", "head"]
    first = subprocess.Popen([sys.executable, "-m", "train", *train_argv(out, *base), "--steps", "150",
                              "--log-every", "50"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").is_file():  # written while the first run holds the lock
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        capsys.readouterr()
        for extra in ([], ["--resume"]):
            assert main(train_argv(out, *base, "--steps", "150", "--log-every", "50", *extra)) == 2
            err = _lines(capsys.readouterr().err)
            assert len(err) == 1 and "is in use by another run" in err[0] and str(out) in err[0], err
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, stderr
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150]  # one run's lines only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 150 and summary["before"] and summary["after"]
    assert set(load_file(out / "adapter" / "head_model.safetensors")) == {"classifier.weight", "classifier.bias"}


def _refit_weights(args):
    folder = Path(args[1])
    tiny_bert_classifier(num_labels=2, seed=7).save_pretrained(folder)


def _touch_tokenizer(args):
    path = Path(args[1]) / "tokenizer_config.json"
    raw = json.loads(path.read_text())
    raw["model_max_length"] = 99
    path.write_text(json.dumps(raw))


def _new_rows(args):
    path = Path(args[3])
    path.write_text(path.read_text().replace("great", "grand"))


# group -> (how the resumed command or its inputs differ, the field the refusal must name)
RESUME_CHANGES = {
    "model-option": (["--lora-alpha", "16"], None, r"model\.lora_alpha: 8\.0 -> 16\.0"),
    "model-method": (["--method", "head", "--lora-r", "8"], None, r"model\.method: 'lora' -> 'head'"),
    "model-weights": ([], _refit_weights, r"model fingerprint model\.safetensors"),
    "tokenizer": ([], _touch_tokenizer, r"tokenizer fingerprint tokenizer_config\.json"),
    "data-option": (["--max-length", "24"], None, r"data\.max_length: 256 -> 24"),
    "data-content": ([], _new_rows, r"data fingerprint data_sha256"),
    "data-file": (["--data", "OTHER"], None, r"data\.data: '.*data\.csv' -> '.*other\.csv'"),
    "loop": (["--seed", "5"], None, r"loop\.seed: 0 -> 5"),
}


@pytest.mark.parametrize("group", list(RESUME_CHANGES))
def test_resume_refuses_a_change_to_what_decides_the_numbers(folders, tmp_path, capsys, group):
    flags, change, pattern = RESUME_CHANGES[group]
    args = _private(folders, tmp_path)
    out = tmp_path / "run"
    common = ["--method", "lora", "--target-modules", "query", "value"]
    assert main(train_argv(out, *args, *common, "--save-every", "1")) == 0
    shutil.copy(tmp_path / "data.csv", tmp_path / "other.csv")
    if change is not None:
        change(args)
    flags = [str(tmp_path / "other.csv") if f == "OTHER" else f for f in flags]
    if "--method" in flags:
        common = []
    before = snapshot(out)
    capsys.readouterr()
    assert main(train_argv(out, *args, *common, *flags, "--resume")) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: --resume: ") and "refusing to continue" in err[0], err
    assert __import__("re").search(pattern, err[0]), err[0]
    assert snapshot(out) == before


def _crash_at(monkeypatch, step_index):
    import train.loop as loop
    real = loop.lr_factor

    def crash(step, *a):
        if step == step_index:
            raise RuntimeError("simulated crash")
        return real(step, *a)
    monkeypatch.setattr(loop, "lr_factor", crash)


def test_crash_then_resume_is_bit_identical_despite_torn_and_orphan_files(folders, tmp_path, monkeypatch, capsys):
    args = [*_private(folders, tmp_path), "--method", "lora", "--target-modules", "query", "value",
            "--lora-dropout", "0.1", "--steps", "6", "--log-every", "4", "--save-every", "3"]
    assert main(train_argv(tmp_path / "whole", *args)) == 0
    broken = tmp_path / "broken"
    with monkeypatch.context() as m:
        _crash_at(m, 4)  # dies in step 5, after the checkpoint of step 3
        assert main(train_argv(broken, *args)) == 2
    assert "simulated crash" in capsys.readouterr().err
    ckpts = broken / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["folder"] == "step-00000003"
    (ckpts / "latest.json").write_text('{"step": 3, "fol')                 # a torn pointer
    with open(broken / "metrics.jsonl", "a") as f:                          # a torn log line
        f.write('{"kind": "train", "step": 4, "lo')
    (ckpts / ".step-00000006.x1y2").mkdir()                                  # a killed checkpoint write
    (ckpts / ".step-00000006.x1y2" / "trainable.safetensors").write_bytes(b"half")
    (broken / "adapter").mkdir()
    (broken / "adapter" / ".adapter_model.safetensors.abc.tmp").write_bytes(b"half")
    assert main(train_argv(broken, *args, "--resume")) == 0
    assert not list(ckpts.glob(".step-*")) and not list((broken / "adapter").glob(".*.tmp"))
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl"):
        if name == "metrics.jsonl":  # same losses and steps; timings differ
            strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k not in ("tokens_per_s", "s_per_step")}
                               for ln in p.read_text().splitlines()]
            assert strip(broken / name) == strip(tmp_path / "whole" / name)
        else:
            assert (broken / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    whole, resumed = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "whole", broken))
    assert resumed["before"] == whole["before"] and resumed["before"]["accuracy"] >= 0
    assert resumed["after"] == whole["after"] and resumed["final_loss"] == whole["final_loss"]


def test_disk_full_during_a_checkpoint_is_one_error_and_the_run_resumes(folders, tmp_path, monkeypatch, capsys):
    import train.checkpoint as ck
    args = [*_private(folders, tmp_path), "--method", "head", "--steps", "4", "--save-every", "2"]
    out = tmp_path / "run"
    real, calls = ck.save_file, []

    def fill_up(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) > 3:  # the second checkpoint (each writes three safetensors files)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(ck, "save_file", fill_up)
        capsys.readouterr()
        assert main(train_argv(out, *args)) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "the previous checkpoint is intact" in err[0] and "step-00000002" in err[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step-00000002"]
    assert main(train_argv(out, *args, "--resume")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def _bundled(monkeypatch, folders):
    """``--model llama`` resolves like a bundled name: to a folder elsewhere (a cache)."""
    import train.run
    real = train.run.resolve_model
    monkeypatch.setattr(train.run, "resolve_model", lambda n: folders / "tiny-llama" if n == "llama" else real(n))


def test_files_get_ordinary_modes_and_configs_name_the_model_as_given(folders, tmp_path, monkeypatch):
    _bundled(monkeypatch, folders)
    out = tmp_path / "run"
    assert main(train_argv(out, "--model", "llama", "--data", str(folders / "chat.jsonl"), "--max-length", "32",
                           "--method", "lora")) == 0
    for p in [out, *out.rglob("*")]:
        want = default_dir_mode() if p.is_dir() else default_mode()
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))
    for folder in (out / "adapter", out / "checkpoints" / "step-00000003" / "adapter"):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "llama"


def test_text_init_records_the_tokenizer_as_named(folders, tmp_path, monkeypatch):
    _bundled(monkeypatch, folders)
    out = tmp_path / "run"
    assert main(train_argv(out, "--model", "llama", "--data", str(folders / "chat.jsonl"), "--max-length", "32",
                           "--method", "prompt", "--n-virtual", "4", "--prompt-init", "text",
                           "--prompt-init-text", "hello world")) == 0
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert raw["prompt_tuning_init"] == "TEXT" and raw["tokenizer_name_or_path"] == "llama"
    assert raw["base_model_name_or_path"] == "llama"


def test_soft_prompt_classifier_on_a_decoder_trains_on_left_padding(folders, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(out, "--model", str(folders / "tiny-llama"), "--data", str(folders / "reviews.csv"),
                           "--task", "classify", "--method", "prompt", "--n-virtual", "4")) == 0
    assert json.loads((out / "summary.json").read_text())["task"] == "seq_cls"


def test_ptuning_honours_a_text_init(folders):
    from tests.models import tiny_causal_lm, tiny_tokenizer
    from train.adapters import build_adapted
    from train.config import ModelConfig
    tok, backbone = tiny_tokenizer(), tiny_causal_lm("llama")
    pm = build_adapted(backbone, ModelConfig(method="ptuning", n_virtual=3, prompt_init="text",
                                             prompt_init_text="hello world"), "causal_lm", tok)
    ids = tok("hello world")["input_ids"]
    want = backbone.get_input_embeddings().weight[torch.tensor((ids * 3)[:3])]
    assert pm.config.init == "text" and torch.equal(pm.table.weight.detach(), want.detach().float())


def test_large_weight_files_get_a_sampled_fingerprint(tmp_path, monkeypatch):
    import train.fingerprint as fp
    monkeypatch.setattr(fp, "_FULL_HASH_LIMIT", 1 << 20)
    data = bytearray(os.urandom(8 << 20))
    path = tmp_path / "w.safetensors"
    path.write_bytes(bytes(data))
    first = fp.sampled_sha256(path)
    assert first.startswith("sampled:") and fp.sampled_sha256(path) == first
    data[(len(data) - (1 << 16)) * 10 // 63 + 5] ^= 1  # inside the 11th sample: a changed weight is seen
    path.write_bytes(bytes(data))
    assert fp.sampled_sha256(path) != first
    small = tmp_path / "s.bin"
    small.write_bytes(b"abc")
    assert fp.sampled_sha256(small) == fp.file_sha256(small)
