"""Training-step time and peak memory per method, ours vs peft (bitsandbytes for the NF4 base).

One step = forward + backward + AdamW step + zero_grad on a fixed random batch. Ours and peft
are built on copies of the same backbone and timed alternately in this one process; medians.
Peak memory = bytes torch allocates during one step above what was allocated before it.

    python benchmarks/bench_step.py            # MiniLM 16x64, fp32 + bf16 autocast (~3 min)
    python benchmarks/bench_step.py --full     # + SmolLM2-135M 4x128 (many minutes on 2 cores)
    python benchmarks/bench_step.py --backbones smollm2 --precisions fp32 --threads 1 --clock cpu
Each backbone's table goes to its own docs section (step-minilm, step-smollm2, ...-gpu).
    python benchmarks/bench_step.py --quick    # tiny random models, seconds
"""
from __future__ import annotations

import gc

import torch

import _backbones as B
from _common import (bench_args, emit, markdown_table, median_ms, mib, peak_memory, ratio,
                     section_name, setup, should_write, time_alternating)

# ---------------------------------------------------------------------------------- knobs
BACKBONES = ("minilm",)                 # default run
FULL_BACKBONES = ("minilm", "smollm2")  # --full
QUICK_BACKBONES = ("tiny-bert", "tiny-llama")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # bf16 = autocast over an fp32 model
METHODS = B.METHODS
N_VIRTUAL = 20   # soft-prompt length
RANK = 8         # LoRA rank (alpha = 2 * rank), targets: query/value or q_proj/v_proj
REPEATS = 5
SECTION = "step"


def measure(bb: B.Backbone, method: str, amp, warmup: int, repeats: int,
            device: str = "cpu") -> list:
    """One table row: times, ratios and peak memory of ours and peft for one case."""
    batch = B.make_batch(bb, device=device)
    kw = {"n_virtual": N_VIRTUAL} if method in B.PROMPT_METHODS else {"r": RANK}
    kw["device"] = device
    steps, trainable = {}, {}
    for side, build in B.builders(bb, method, **kw).items():
        model = build()
        trainable[side] = B.n_trainable(model)
        steps[side] = B.train_step(model, batch, amp)
    times = time_alternating(steps, warmup=warmup, repeats=repeats, device=device)
    ms = {k: median_ms(v) for k, v in times.items()}
    mem = {k: peak_memory(f, device) for k, f in steps.items()}
    return [f"{trainable['ours']:,}", f"{ms['ours']:.0f}", f"{ms['peft']:.0f}",
            ratio(ms["ours"], ms["peft"]), mib(mem["ours"]), mib(mem["peft"]),
            ratio(mem["ours"], mem["peft"])]


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=REPEATS)
    p.add_argument("--full", action="store_true", help="also SmolLM2-135M (4 x 128)")
    p.add_argument("--backbones", nargs="+", choices=list(B.BACKBONES), help="overrides --full")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    args = p.parse_args()
    threads = setup(args)
    names = (args.backbones or (QUICK_BACKBONES if args.quick else
                                FULL_BACKBONES if args.full else BACKBONES))
    repeats = 2 if args.quick else args.repeats
    for name in names:
        bb = B.load(name)
        rows, source = [], f"{name}: {bb.source}, batch {bb.batch} x {bb.seq}"
        for prec in args.precisions:
            for method in args.methods:
                try:
                    cells = measure(bb, method, PRECISIONS[prec], args.warmup, repeats,
                                    args.device)
                except Exception as exc:  # a missing feature must not hide the other rows
                    cells = [f"error: {type(exc).__name__}: {str(exc)[:60]}"] + [""] * 6
                rows.append([name, method, prec] + cells)
                print(" | ".join(rows[-1]), flush=True)
                gc.collect()
        report(name, rows, source, repeats, threads, args)


def report(name: str, rows: list, source: str, repeats: int, threads: int, args) -> None:
    """Print one backbone's table and write it into its own docs section."""
    table = markdown_table(["backbone", "method", "precision", "trainable", "ours ms", "peft ms",
                            "time ours/peft", "ours MiB", "peft MiB", "mem ours/peft"], rows)
    notes = (f"Backbone {source}. Median of {repeats} alternating steps after "
             f"{args.warmup} warm-up. {N_VIRTUAL} virtual tokens; LoRA r={RANK}, alpha={2 * RANK} "
             "on query/value (q_proj/v_proj); QLoRA = NF4 + double quantization on every other "
             "linear (peft side: bitsandbytes Linear4bit); IA3 on the model type's default targets. "
             "Peak memory = torch allocations during "
             "one step above the level before it. Lower ratios are better.")
    on_gpu = args.device != "cpu"
    title = f"Training step per method: {name}" + (" (GPU)" if on_gpu else "")
    emit(section_name(SECTION, name, args.device), title, threads, table, notes,
         device=args.device, write=should_write(args))


if __name__ == "__main__":
    main()
