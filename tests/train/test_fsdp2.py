"""FSDP2 under torchrun (2 gloo processes on CPU): equal to one process, and kill -9 -> resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train._fsdp_worker import STEPS

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _single(run_dir: Path, mode: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.train._fsdp_worker", str(run_dir), mode, *extra]


def _torchrun(run_dir: Path, mode: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "tests.train._fsdp_worker", str(run_dir), mode, *extra]


def _final(run_dir: Path) -> dict:
    folder = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    return {**load_file(folder / "trainable.safetensors"),
            **{"opt." + k: v for k, v in load_file(folder / "optimizer.safetensors").items()}}


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["loss"] for ln in lines if json.loads(ln)["kind"] == "train"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One single-process run and one 2-process FSDP2 run, LoRA and QLoRA each."""
    root = tmp_path_factory.mktemp("fsdp2")
    subprocess.run(_single(root / "single", "single"), check=True, cwd=ROOT, env=_env(),
                   timeout=240)
    subprocess.run(_torchrun(root / "fsdp2", "fsdp2"), check=True, cwd=ROOT, env=_env(),
                   timeout=300)
    return root


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp2_two_processes_equal_one_process(fsdp_runs, method):
    single, sharded = fsdp_runs / "single" / method, fsdp_runs / "fsdp2" / method
    a, b = _final(single), _final(sharded)
    assert a.keys() == b.keys() and any(k.endswith("lora_B.weight") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    la, lb = _losses(single), _losses(sharded)
    assert len(la) == len(lb) == STEPS
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), atol=1e-6, rtol=1e-5)
    state = json.loads((sharded / "checkpoints" / f"step-{STEPS:08d}" / "state.json").read_text())
    assert state["world_size"] == 2 and state["loop"]["distributed"] == "fsdp2"
    layout = json.loads((sharded / "layout.json").read_text())  # the frozen base is sharded
    packed = [v for v in layout.values() if v[0] == "torch.uint8"]
    assert bool(packed) == (method == "qlora")
    assert all(local < total for _, total, local in layout.values() if total > 1)
    assert all(local == total for _, total, local in
               json.loads((single / "layout.json").read_text()).values())
    # adapter-only checkpoints: no base weight (dense or packed NF4) is written
    assert all("lora_" in k for k in load_file(sharded / "checkpoints" / f"step-{STEPS:08d}" /
                                               "trainable.safetensors"))


def test_fsdp2_qlora_killed_run_resumes_to_the_same_bits(fsdp_runs, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(killed, "slow"), cwd=ROOT, env=_env(),
                            start_new_session=True)  # its own group: kill -9 reaches every rank
    pointer = killed / "qlora" / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # wait for the step-2 checkpoint, then kill -9
            if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 2:
                break
            assert proc.poll() is None, "the slow run ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    stopped_at = json.loads(pointer.read_text())["step"]
    assert 2 <= stopped_at < STEPS
    subprocess.run(_torchrun(killed, "fsdp2", "--resume"), check=True, cwd=ROOT, env=_env(),
                   timeout=300)
    a, b = _final(fsdp_runs / "fsdp2" / "qlora"), _final(killed / "qlora")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit: adapter and AdamW moments
    assert _losses(fsdp_runs / "fsdp2" / "qlora") == _losses(killed / "qlora")


def test_cli_qlora_under_torchrun_fsdp2(tmp_path):
    from tests.models import tiny_causal_lm, tiny_tokenizer
    folder, out = tmp_path / "tiny-llama", tmp_path / "run"
    tiny_causal_lm("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    items = [{"instruction": "Say hello", "input": f"text {i}", "output": "hello world"}
             for i in range(12)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train", "train", "--method", "qlora", "--model", str(folder),
           "--data", str(tmp_path / "chat.jsonl"), "--distributed", "fsdp2", "--steps", "2",
           "--batch-size", "2", "--max-length", "32", "--log-every", "1", "--no-progress",
           "--device", "cpu", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "qlora"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k and torch.isfinite(v).all() for k, v in adapter.items())
    state = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and state["loop"]["distributed"] == "fsdp2"
