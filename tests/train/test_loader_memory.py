"""Peak memory of a 4-bit load_backbone on a sharded bf16 checkpoint: never the dense model.

Measured in a fresh subprocess as the growth of the kernel's peak-RSS mark (VmHWM, reset with
/proc/self/clear_refs right before loading, after the modelling code is imported). The bound is generous (the real numbers are in
benchmarks/bench_load.py) but far below what holding the bf16 model would take.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]

# 4 layers of hidden 1024 / MLP 4096: 64M linear weights = 128 MiB bf16, largest tensor 8 MiB
CONFIG = dict(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)

CHILD = r"""
import gc, json, sys, torch
import lora
from train.models import load_backbone

def status(field):  # bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

import transformers  # the modelling code and NF4 tables load before the baseline
with torch.device("meta"):
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(sys.argv[1]))
lora.quantize_nf4(torch.randn(64, 64), 64, True)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS mark := current RSS
before = status("VmRSS")
model = load_backbone(sys.argv[1], "causal_lm", dtype=torch.bfloat16,
                      quantize=lora.NF4Config(compute_dtype=torch.bfloat16))
peak = status("VmHWM")
report = lora.memory_report(model)
print(json.dumps(dict(grew=peak - before, nf4=report.quantized_bytes, dense=report.other_bytes)))
"""


def test_qlora_load_peak_stays_near_the_4bit_model(tmp_path):
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG),
                                                              dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random values, cheaper than the model's own initializers
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(tmp_path, max_shard_size="40MB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    del model
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    bound = 1.25 * (stats["nf4"] + stats["dense"] + largest) + 16 * 2**20  # + allocator slack
    assert bound < 0.6 * full  # the bound really excludes holding the bf16 model
    assert stats["grew"] < bound, (f"peak grew {stats['grew'] / 2**20:.1f} MiB; bound "
                                   f"{bound / 2**20:.1f} MiB; bf16 model {full / 2**20:.1f} MiB")


TRIM_CHILD = r"""
import torch
from train.memory import release_freed_memory

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

big = torch.ones(4 << 20)  # freeing a 16 MiB block raises glibc's mmap threshold above 1 MiB
del big
keep, drop = [], []
for i in range(200):  # 200 x 1 MiB on the heap, every other one kept: holes, not a free top
    (keep if i % 2 else drop).append(torch.ones(1 << 18))
keep.append(torch.ones(1 << 18))
before = rss()
del drop
held = rss()
release_freed_memory()
print(before, held, rss())
"""


def test_release_freed_memory_gives_heap_holes_back():
    out = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True)
    before, held, after = map(int, out.stdout.split())
    assert held > before - 20 * 2**20  # freeing alone keeps (almost all of) the 100 MiB of holes
    assert after < held - 60 * 2**20  # released: most of the 100 MiB leaves the process
