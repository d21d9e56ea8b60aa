"""Peak memory of quantize_model: near the quantized size plus one dense layer.

Measured in a fresh subprocess as the growth of the kernel's peak-RSS mark (VmHWM, reset with
/proc/self/clear_refs right before quantizing), so imports and other tests do not count. The model's dense weights come from a safetensors file and the model itself is
built on the meta device: a quantizer that materialized the dense model would need its full
fp32 size, which is far above the bound asserted here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]

# 2 layers of hidden 1024 / MLP 4096: 32M linear weights = 128 MiB fp32, largest layer 16 MiB
CONFIG = dict(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)

CHILD = r"""
import gc, json, sys, torch, transformers
import lora

def status(field):  # bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

config = transformers.LlamaConfig(**json.loads(sys.argv[2]))
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS mark := current RSS
before = status("VmRSS")
lora.quantize_model(model, checkpoint=sys.argv[1], double_quant=True)
peak = status("VmHWM")
report = lora.memory_report(model)
print(json.dumps(dict(before=before, peak=peak, total=report.total_bytes,
                      bits=report.bits_per_param)))
"""


def test_quantize_peak_memory_near_quantized_size_plus_one_layer(tmp_path):
    config = transformers.LlamaConfig(**CONFIG)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in
                  transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen).to(d) * 0.02 for k, (s, d) in shapes.items()}
    dense_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    path = tmp_path / "dense.safetensors"
    save_file(tensors, str(path))
    del tensors
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(CONFIG)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    grew = stats["peak"] - stats["before"]
    # quantized model + 2 dense layers of working memory + 16 MiB slack for allocator arenas
    bound = stats["total"] + 2 * largest + 16 * 2**20
    assert bound < 0.6 * dense_bytes  # the bound really excludes holding the dense model
    assert grew < bound, (f"peak grew {grew / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB; "
                          f"dense {dense_bytes / 2**20:.1f} MiB")
    assert abs(stats["bits"] - 4.127) < 0.01
