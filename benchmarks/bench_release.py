"""CPU heap hand-back after each training step (LoopConfig.release_memory): step time vs peak.

Every case trains through ``train.run.run`` (the CLI's path) in a fresh process per mode,
``step`` (glibc ``malloc_trim`` after every optimizer step) and ``never`` (the heap stays with
the process), alternating over the repeats. Reported: the median s/step of the metrics windows
after the first, the process's peak RSS (VmHWM) and its minor page faults per step.

    python benchmarks/bench_release.py                 # MiniLM prompt tuning, SmolLM2 QLoRA
    python benchmarks/bench_release.py --quick         # MiniLM, 6 steps, no docs
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys

import _common
from _common import bench_args, emit, markdown_table, ratio, set_threads, should_write

CHILD = r"""
import json, resource, sys, tempfile
import torch
torch.set_num_threads(int(sys.argv[1]))
from train.config import DataConfig, LoopConfig, ModelConfig, RunConfig
from train.run import run
case = json.loads(sys.argv[2])
cfg = RunConfig(ModelConfig(**case["model"]), DataConfig(**case["data"]), LoopConfig(**case["loop"]))
out = tempfile.mkdtemp()
run(cfg, out)
rows = [json.loads(l) for l in open(out + "/metrics.jsonl")]
windows = [r["s_per_step"] for r in rows if r.get("kind") == "train"]
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] * 1024
print("RESULT " + json.dumps({"windows": windows, "peak": peak,
                              "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}))
"""

CASES = {
    "MiniLM prompt tuning, bf16, batch 16x64": {
        "model": {"method": "prompt", "model": "minilm", "n_virtual": 20},
        "data": {"data": "rotten_tomatoes", "task": "classify", "max_length": 64, "max_eval": 16},
        "loop": {"steps": 40, "batch_size": 16, "lr": 0.03, "precision": "bf16", "log_every": 5}},
    "SmolLM2 QLoRA, fp32, batch 8x96": {
        "model": {"method": "qlora", "model": "smollm2", "lora_r": 8, "lora_alpha": 16,
                  "target_modules": ["q_proj", "v_proj"]},
        "data": {"data": "rotten_tomatoes", "task": "instruct", "template": "auto", "max_length": 96,
                 "max_eval": 8},
        "loop": {"steps": 20, "batch_size": 8, "lr": 1e-3, "precision": "fp32", "log_every": 5}},
}
MODES = ("step", "never")


def run_child(case: dict, mode: str, threads: int, steps: int | None) -> dict:
    case = copy.deepcopy(case)
    case["loop"].update(release_memory=mode, progress=False, device="cpu")
    if steps:
        case["loop"].update(steps=steps, log_every=max(1, steps // 3))
    env = dict(os.environ, PYTHONPATH=str(_common.ROOT), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), json.dumps(case)], capture_output=True,
                         text=True, env=env, cwd=str(_common.ROOT))
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"{mode}: " + " / ".join((out.stderr or out.stdout).strip().splitlines()[-3:]))
    r = json.loads(line[0][len("RESULT "):])
    r["steps"] = case["loop"]["steps"]
    return r


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: per case)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    cases = dict(list(CASES.items())[:1]) if args.quick else CASES
    steps = 6 if args.quick and args.steps is None else args.steps
    rows = []
    for name, case in cases.items():
        got = {m: [] for m in MODES}
        for i in range(args.repeats):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                print(f"{name}: {mode} (round {i + 1})", flush=True)
                got[mode].append(run_child(case, mode, threads, steps))
        s = {m: statistics.median(w for r in got[m] for w in (r["windows"][1:] or r["windows"])) for m in MODES}
        peak = {m: statistics.median(r["peak"] for r in got[m]) / 2**20 for m in MODES}
        faults = {m: statistics.median(r["faults"] / r["steps"] for r in got[m]) for m in MODES}
        rows.append([name, f"{s['step']:.3f}", f"{s['never']:.3f}", ratio(s["step"], s["never"]),
                     f"{peak['step']:,.0f}", f"{peak['never']:,.0f}", ratio(peak["step"], peak["never"]),
                     f"{faults['step'] / 1e3:,.0f}k / {faults['never'] / 1e3:,.0f}k"])
    table = markdown_table(["case", "step: s/step", "never: s/step", "time step/never", "step: peak MiB",
                            "never: peak MiB", "peak step/never", "minor faults per step (step / never)"], rows)
    notes = (f"One fresh process per run, {args.repeats} round(s) alternating the order; s/step = median of "
             "the metrics windows after the first; peak = the process's VmHWM (imports, model, data, "
             "evaluation included); faults = the process's minor page faults / steps. `auto`, the "
             "default, is `step` for a model with packed 4-bit weights and `never` otherwise.")
    emit("release", "CPU heap hand-back after each step: time vs peak", threads, table, notes,
         write=should_write(args))


if __name__ == "__main__":
    main()
