"""QLoRA on a Llama-3.1-8B-shaped model on one CUDA GPU: ours (each NF4 backend) vs peft + bitsandbytes.

    python benchmarks/gpu_qlora_8b.py [--out docs/benchmarks_gpu_qlora_8b.md]   # CUDA, ~5-8 min
    python benchmarks/gpu_qlora_8b.py --smoke      # tiny config, a few steps, CPU or GPU (< 2 min)

The model is built from Llama-3.1-8B's config with random weights (nothing is downloaded),
directly on the device in bf16, seeded so both sides get the same weights. Every linear layer of
the decoder (q, k, v, o, gate, up, down; not lm_head) is quantized to NF4 with double
quantization (blocksize 64, bf16 compute) and gets LoRA r16 / alpha 32 in fp32; sequence 2048,
batch 1, bf16 autocast, non-reentrant activation checkpointing per decoder layer, AdamW on the
adapters. Rows:
- ours, backend "torch" (the default, pure PyTorch), "compile" (torch.compile'd dequantize) and
  "bnb" (bitsandbytes' CUDA dequantize kernels): one model, the same packed storage, only
  ``NF4Linear.backend`` changes between rows;
- peft + bitsandbytes ``Linear4bit`` (nf4, compress_statistics, bf16 compute), LoRA on the same
  modules.
Step time: median of the timed steps after warm-up (CUDA-synchronized). Peak: the maximum of
``torch.cuda.max_memory_allocated`` during the steps, minus what was allocated before that
model was built (torchtune reports 7.4 GiB for its QLoRA recipe on this model). Resident: the
model's memory after building, before any step.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
from lora.nf4_linear import NF4Linear  # noqa: E402

# ---------------------------------------------------------------------------------- knobs
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                   bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32
BLOCKSIZE = 64
SEED = 0


def build_base(config: dict, device: torch.device) -> transformers.PreTrainedModel:
    """The random-init bf16 model, built on ``device`` (same seed -> same weights)."""
    torch.manual_seed(SEED)
    cfg = transformers.LlamaConfig(**config)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def build_ours(config: dict, device: torch.device) -> torch.nn.Module:
    model = build_base(config, device)
    lora.quantize_model(model, skip=("lm_head",), blocksize=BLOCKSIZE, double_quant=True,
                        compute_dtype=torch.bfloat16)  # on the model's device
    torch.manual_seed(SEED + 1)
    model = lora.add_lora(model, lora.LoRAConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters under bf16 autocast
    return model


def build_peft(config: dict, device: torch.device) -> torch.nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    model = build_base(config, device)
    names = [n for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and n.rsplit(".", 1)[-1] in TARGETS]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, attr)
        q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=BLOCKSIZE,
                                     bnb_quantized=False).to(device)  # quantizes on the move
        if dense.bias is not None:
            q.bias = dense.bias
        setattr(parent, attr, q)
        del dense
    torch.manual_seed(SEED + 1)
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                            target_modules=list(TARGETS)))


def make_step(model: torch.nn.Module, batch: dict, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def measure(step, device: torch.device, warmup: int, repeats: int, base_bytes: int) -> dict:
    """Median step seconds, peak GiB above ``base_bytes``, last loss."""
    for _ in range(warmup):
        loss = step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = ((torch.cuda.max_memory_allocated(device) - base_bytes) / 2**30
            if device.type == "cuda" else float("nan"))
    return {"s_step": statistics.median(times), "peak_gib": peak, "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config, few steps (any device)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--backends", default="torch,compile,bnb", help="ours' NF4 backends, in order")
    ap.add_argument("--no-peft", action="store_true", help="skip the peft + bitsandbytes row")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        sys.exit("no CUDA device: the 8B run needs a GPU (use --smoke for a CPU check)")
    config = SMOKE if args.smoke else LLAMA_31_8B
    seq = args.seq or (32 if args.smoke else 2048)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 5)
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, config["vocab_size"], (1, seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    rows = []

    before = _allocated(device)
    t0 = time.perf_counter()
    ours = build_ours(config, device)
    _sync(device)
    build_s, resident = time.perf_counter() - t0, (_allocated(device) - before) / 2**30
    print(f"ours built in {build_s:.1f} s, resident {resident:.2f} GiB; "
          f"{lora.memory_report(ours)}", flush=True)
    step = make_step(ours, batch, device)
    layers = [m for m in ours.modules() if isinstance(m, NF4Linear)]
    for backend in [b for b in args.backends.split(",") if b]:
        for m in layers:
            m.backend = backend
        r = measure(step, device, warmup, repeats, before)
        rows.append({"row": f"ours, NF4 backend `{backend}`", "resident": resident, **r})
        print(rows[-1], flush=True)
    del ours, step, layers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.no_peft:
        before = _allocated(device)
        ref = build_peft(config, device)
        _sync(device)
        resident = (_allocated(device) - before) / 2**30
        r = measure(make_step(ref, batch, device), device, warmup, repeats, before)
        rows.append({"row": "peft + bitsandbytes Linear4bit", "resident": resident, **r})
        print(rows[-1], flush=True)

    ref_s = rows[-1]["s_step"] if not args.no_peft else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    lines = [f"# QLoRA on a Llama-3.1-8B-shaped model ({name})" if not args.smoke else
             f"# QLoRA smoke run (tiny Llama config, {name})", "",
             f"`benchmarks/gpu_qlora_8b.py`{' --smoke' if args.smoke else ''}: random init, NF4 + "
             f"double quant on {', '.join(TARGETS)}, LoRA r{RANK}, sequence {seq}, batch 1, bf16 "
             f"autocast, activation checkpointing; median of {repeats} steps after {warmup} "
             f"warm-up. torch {torch.__version__}, transformers {transformers.__version__}.", "",
             "| row | s/step | vs peft+bnb | peak GiB | resident GiB | loss |",
             "|---|---:|---:|---:|---:|---:|"]
    gib = (lambda v: f"{v:.2f}") if device.type == "cuda" else (lambda v: "n/a")  # noqa: E731
    for r in rows:
        ratio = f"{r['s_step'] / ref_s:.2f}x" if ref_s else "n/a"
        lines.append(f"| {r['row']} | {r['s_step']:.3f} | {ratio} | {gib(r['peak_gib'])} | "
                     f"{gib(r['resident'])} | {r['loss']:.3f} |")
    lines += ["", "Loss: the last timed step's. Ours' rows train one model in turn (backend "
              "`torch` first), so only that row and peft's have taken the same steps."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
