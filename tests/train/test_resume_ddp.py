"""Real processes: a killed run resumes to the same bits; torchrun DDP on 2 gloo processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def _worker(run_dir: Path, mode: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.train._worker", str(run_dir), mode, *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _final(run_dir: Path, step: int) -> dict:
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    return {**load_file(folder / "trainable.safetensors"),
            **{"opt." + k: v for k, v in load_file(folder / "optimizer.safetensors").items()}}


def test_killed_run_resumes_to_the_same_bits(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_worker(ref, "resume"), check=True, cwd=ROOT, env=_env(), timeout=120)
    proc = subprocess.Popen(_worker(killed, "slow"), cwd=ROOT, env=_env())
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # wait for the step-6 checkpoint, then kill -9
            if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 6:
                break
            assert proc.poll() is None, "the slow run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    stopped_at = json.loads(pointer.read_text())["step"]
    assert proc.returncode == -signal.SIGKILL and 6 <= stopped_at < 12
    subprocess.run(_worker(killed, "resume", "--resume"), check=True, cwd=ROOT, env=_env(), timeout=120)
    a, b = _final(ref, 12), _final(killed, 12)
    assert a.keys() == b.keys() and len(a) >= 6
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit: weights and AdamW moments
    ref_log = [json.loads(ln) for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    res_log = [json.loads(ln) for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ref_log] == [r["loss"] for r in res_log]  # one line per step, no duplicates


def test_torchrun_ddp_two_gloo_processes_equal_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run(_worker(single, "single"), check=True, cwd=ROOT, env=_env(), timeout=120)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.train._worker", str(ddp), "ddp"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), timeout=180)
    a, b = _final(single, 4), _final(ddp, 4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    start = load_file(single / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert json.loads((ddp / "checkpoints" / "step-00000004" / "state.json").read_text())["world_size"] == 2
    assert all(torch.isfinite(t).all() for t in start.values())
