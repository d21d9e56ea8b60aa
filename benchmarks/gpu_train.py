"""Training-step benchmark through the real loop: AMP bf16 / fp16, QLoRA, peak memory.

usage: python benchmarks/gpu_train.py [OUT.md]   (default docs/benchmarks_gpu_train.md)

On CUDA: a llama-shaped model built from a config (random weights, no download) with LoRA under
bf16 autocast, fp16 autocast (+ GradScaler) and a bf16 QLoRA (NF4 base), then the same for
SmolLM2-135M-Instruct when its package is installed. Each row runs ``train.loop.train`` for
STEPS steps on fixed random batches and reports the median s/step, tokens/s and peak allocated
memory. On a machine without CUDA it runs a tiny CPU smoke of the same rows (< 1 minute).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
from train.config import LoopConfig  # noqa: E402
from train.data import PadCollator  # noqa: E402
from train.loop import train  # noqa: E402

# ---- knobs -------------------------------------------------------------------------------------
CUDA = torch.cuda.is_available()
STEPS = 12 if CUDA else 3                   # optimizer steps per row (the median skips warm-up)
BATCH, SEQ = (8, 512) if CUDA else (2, 32)  # sequences per step, tokens per sequence
LORA = dict(r=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048) if CUDA else \
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
SEED = 0


def llama_from_config(dtype: torch.dtype) -> transformers.PreTrainedModel:
    torch.manual_seed(SEED)
    cfg = transformers.LlamaConfig(**LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def smollm2(dtype: torch.dtype):
    try:
        from train.models import load_backbone, resolve_model
        return load_backbone(resolve_model("smollm2"), "causal_lm", dtype=dtype)
    except (FileNotFoundError, ImportError) as e:
        print(f"skip SmolLM2: {e}")
        return None


def examples(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, vocab, (BATCH * (STEPS + 1), SEQ), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def bench_row(name: str, build, precision: str, qlora: bool) -> dict:
    """Build the model, add (Q)LoRA, run the loop, return s/step, tokens/s, peak memory."""
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    base = build(dtype if CUDA else torch.float32)
    if base is None:
        return {}
    base.to(device)
    if qlora:
        lora.quantize_model(base, skip=("lm_head",), compute_dtype=dtype)
    model = lora.add_lora(base, lora.LoRAConfig(**LORA))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters under autocast
    vocab = model.config.vocab_size
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cfg = LoopConfig(steps=STEPS, batch_size=BATCH, precision=precision, progress=False, log_every=1,
                     device=str(device), save_every=0)
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        result = train(model, examples(vocab), PadCollator(pad_id=0), cfg, run_dir, lr=1e-4)
        wall = time.perf_counter() - t0
        lines = [ln for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    import json
    steps = [json.loads(ln)["s_per_step"] for ln in lines][2:] or [result.seconds_per_step]
    s_step = statistics.median(steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
    row = {"row": name, "precision": precision, "qlora": qlora, "s_per_step": s_step,
           "tokens_per_s": BATCH * SEQ / s_step, "peak_gib": peak, "final_loss": result.final_loss,
           "wall_s": wall}
    del model, base
    if CUDA:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "benchmarks_gpu_train.md"
    device = torch.cuda.get_device_name() if CUDA else "CPU (smoke run: tiny model, CUDA rows skipped)"
    plan = [("llama-1.1B-shape" if CUDA else "llama-tiny", llama_from_config)]
    if CUDA:
        plan.append(("SmolLM2-135M", smollm2))
    rows = []
    for name, build in plan:
        for precision, qlora in (("bf16", False), ("fp16", False), ("bf16", True)):
            if not CUDA and precision == "fp16" and qlora:
                continue
            row = bench_row(name, build, precision, qlora)
            if row:
                rows.append(row)
                print(f"{row['row']:<18} {precision} {'QLoRA' if qlora else 'LoRA ':<5} "
                      f"{row['s_per_step']:.4f} s/step {row['tokens_per_s']:>10,.0f} tok/s "
                      f"peak {row['peak_gib']:.2f} GiB loss {row['final_loss']:.3f}", flush=True)
    lines = [f"# Training-step benchmark ({device})", "",
             f"`benchmarks/gpu_train.py`: the real loop (`train.loop.train`), {STEPS} steps of {BATCH} x {SEQ} "
             f"tokens, LoRA r{LORA['r']} on {', '.join(LORA['target_modules'])}; median s/step after 2 warm-up "
             f"steps; peak = `torch.cuda.max_memory_allocated`. torch {torch.__version__}, "
             f"transformers {transformers.__version__}.", "",
             "| model | autocast | method | s/step | tokens/s | peak GiB | final loss |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['precision']} | {'QLoRA (NF4)' if r['qlora'] else 'LoRA'} | "
                     f"{r['s_per_step']:.4f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {r['final_loss']:.3f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
