"""Inference forward: merged and unmerged LoRA vs the plain base model, ours and peft.

A merged LoRA is the base with W + s * B @ A in place of W, so it should cost exactly the base
(target <= 1.01x); unmerged LoRA pays the extra adapter matmuls. peft's merged form is
`merge_adapter()` (wrappers stay in place, as ours do). All candidates run alternately in one
process, eval mode under torch.inference_mode, one fixed batch; medians.

    python benchmarks/bench_merged.py           # MiniLM 16x64, fp32
    python benchmarks/bench_merged.py --full    # + SmolLM2-135M 4x128
    python benchmarks/bench_merged.py --quick   # tiny random models
"""
from __future__ import annotations

import gc

import torch

import _backbones as B
from _common import (bench_args, emit, markdown_table, median_ms, ratio, section_name, setup,
                     should_write, time_alternating)

# ---------------------------------------------------------------------------------- knobs
BACKBONES = ("minilm",)
FULL_BACKBONES = ("minilm", "smollm2")
QUICK_BACKBONES = ("tiny-bert", "tiny-llama")
RANK = 8
REPEATS = 15
SECTION = "merged"


def forward(model: torch.nn.Module, batch: dict) -> callable:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def run() -> None:
        with torch.inference_mode():
            model(**inputs)

    return run


def candidates(bb: B.Backbone, batch: dict, device: str = "cpu") -> dict:
    """name -> forward closure: base, ours/peft unmerged and merged."""
    from lora import merge_lora

    runs = {"base": forward(bb.fresh().to(device), batch)}
    ours_u = B.ours(bb, "lora", r=RANK, device=device)
    ours_m = B.ours(bb, "lora", r=RANK, device=device)
    merge_lora(ours_m)
    peft_u = B.reference(bb, "lora", r=RANK, device=device)
    peft_m = B.reference(bb, "lora", r=RANK, device=device)
    peft_m.merge_adapter()
    runs.update({"ours unmerged": forward(ours_u, batch), "ours merged": forward(ours_m, batch),
                 "peft unmerged": forward(peft_u, batch), "peft merged": forward(peft_m, batch)})
    return runs


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=REPEATS)
    p.add_argument("--full", action="store_true", help="also SmolLM2-135M (4 x 128)")
    p.add_argument("--backbones", nargs="+", choices=list(B.BACKBONES), help="overrides --full")
    args = p.parse_args()
    threads = setup(args)
    names = (args.backbones or (QUICK_BACKBONES if args.quick else
                                FULL_BACKBONES if args.full else BACKBONES))
    repeats = 5 if args.quick else args.repeats
    for name in names:  # one docs section per backbone, written as soon as it is done
        bb = B.load(name)
        rows, sources = [], [f"{name}: {bb.source}, batch {bb.batch} x {bb.seq}"]
        runs = candidates(bb, B.make_batch(bb, device=args.device), args.device)
        times = time_alternating(runs, warmup=args.warmup, repeats=repeats, device=args.device)
        ms = {k: median_ms(v) for k, v in times.items()}
        for cand in runs:
            if cand != "base":
                rows.append([name, cand, f"{ms['base']:.1f}", f"{ms[cand]:.1f}",
                             ratio(ms[cand], ms["base"])])
                print(" | ".join(rows[-1]), flush=True)
        del runs
        gc.collect()
        table = markdown_table(["backbone", "model", "base ms", "model ms", "model/base"], rows)
        notes = ("Backbone " + "; ".join(sources) + f". LoRA r={RANK} on query/value "
                 f"(q_proj/v_proj), fp32, eval, inference_mode. Median of {repeats} alternating "
                 f"rounds after {args.warmup} warm-up. Target: ours merged <= 1.01x base.")
        on_gpu = args.device != "cpu"
        emit(section_name(SECTION, name, args.device),
             f"Merged / unmerged LoRA inference vs the base: {name}" + (" (GPU)" if on_gpu else ""),
             threads, table, notes, device=args.device, write=should_write(args))


if __name__ == "__main__":
    main()
