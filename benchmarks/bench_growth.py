"""How LoRA's training-step cost grows: step time and peak memory vs sequence length and rank,
ours vs peft, so the cost curve of each is visible (not one point).

Backbone: SmolLM2-135M (bundled, else the same shape at random), LoRA on q_proj/v_proj, alpha = 2r,
fp32, batch 1, every position labelled. Sequence sweep at rank 8; rank sweep at sequence 256.
Ours and peft alternate in this one process; medians; peak memory is what torch allocates during
one step above the level before it.

    python benchmarks/bench_growth.py                      # ~10 min on 2 cores
    python benchmarks/bench_growth.py --seqs 64 256 1024 --ranks 4 64
    python benchmarks/bench_growth.py --quick              # tiny llama, seconds
"""
from __future__ import annotations

import dataclasses
import gc

import _backbones as B
from _common import (bench_args, emit, markdown_table, median_ms, mib, peak_memory, ratio, setup,
                     should_write, time_alternating)

# ---------------------------------------------------------------------------------- knobs
SEQS = (64, 128, 256, 512, 1024)
RANKS = (4, 8, 16, 32, 64)
SEQ_AT_RANK = 256    # sequence length of the rank sweep
RANK_AT_SEQ = 8      # rank of the sequence sweep
BATCH = 1
REPEATS = 3
SECTION = "growth"


def point(bb: B.Backbone, seq: int, r: int, warmup: int, repeats: int, device: str) -> list:
    shaped = dataclasses.replace(bb, batch=BATCH, seq=seq)
    batch = B.make_batch(shaped, device=device)
    steps = {side: B.train_step(build(), batch, None) for side, build in
             B.builders(shaped, "lora", r=r, device=device).items()}
    times = time_alternating(steps, warmup=warmup, repeats=repeats, device=device)
    ms = {k: median_ms(v) for k, v in times.items()}
    mem = {k: peak_memory(f, device) for k, f in steps.items()}
    del steps
    gc.collect()
    return [f"{ms['ours']:.0f}", f"{ms['peft']:.0f}", ratio(ms["ours"], ms["peft"]),
            mib(mem["ours"]), mib(mem["peft"]), ratio(mem["ours"], mem["peft"])]


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=REPEATS)
    p.add_argument("--seqs", type=int, nargs="+", default=list(SEQS))
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    args = p.parse_args()
    threads = setup(args)
    bb = B.load("tiny-llama" if args.quick else "smollm2")
    seqs, ranks = (args.seqs[:2], args.ranks[:2]) if args.quick else (args.seqs, args.ranks)
    seq_at_rank = min(SEQ_AT_RANK, max(seqs))
    repeats = 1 if args.quick else args.repeats
    rows = []
    for seq in seqs:
        rows.append(["seq", seq, RANK_AT_SEQ] + point(bb, seq, RANK_AT_SEQ, args.warmup, repeats, args.device))
        print(" | ".join(map(str, rows[-1])), flush=True)
    for r in ranks:
        rows.append(["rank", seq_at_rank, r] + point(bb, seq_at_rank, r, args.warmup, repeats, args.device))
        print(" | ".join(map(str, rows[-1])), flush=True)
    table = markdown_table(["sweep", "seq", "rank", "ours ms", "peft ms", "time ours/peft", "ours MiB",
                            "peft MiB", "mem ours/peft"], rows)
    notes = (f"Backbone {bb.name}: {bb.source}; batch {BATCH}, fp32, LoRA on {'/'.join(bb.targets)}, "
             f"alpha = 2r; median of {repeats} alternating steps after {args.warmup} warm-up. "
             "Lower ratios are better.")
    emit(SECTION, "Growth: LoRA step time and peak memory vs sequence length and rank", threads, table, notes,
         device=args.device, write=should_write(args))


if __name__ == "__main__":
    main()
