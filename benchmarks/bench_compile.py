"""torch.compile variant of bench_step (opt-in): compile time, speed-up, graph breaks.

For each method our adapted model is compiled (`torch.compile(model)`, default inductor) and its
training step timed against the eager step, alternating; compile time = the first compiled step
minus one eager step. `torch._dynamo.explain` then lists every graph break of the forward; a
break whose stack passes through lora/ or softprompt/ is ours (a bug to fix), the others belong
to transformers. With --with-peft, peft's model is compiled and timed too.

    python benchmarks/bench_compile.py                     # MiniLM 16x64, lora + prompt, fp32
    python benchmarks/bench_compile.py --methods lora dora qlora prompt ptuning-mlp ptuning-lstm
    python benchmarks/bench_compile.py --quick             # tiny random BERT
"""
from __future__ import annotations

import gc
import os
import time

import torch

import _backbones as B
from _common import (ROOT, bench_args, emit, markdown_table, median_ms, ratio, setup,
                     should_write, time_alternating)

# ---------------------------------------------------------------------------------- knobs
BACKBONE = "minilm"
QUICK_BACKBONE = "tiny-bert"
METHODS = ("lora", "prompt")
N_VIRTUAL = 20
RANK = 8
REPEATS = 5
SECTION = "compile"
OUR_DIRS = tuple(str(ROOT / d) + os.sep for d in ("lora", "softprompt"))


def graph_breaks(model: torch.nn.Module, batch: dict) -> tuple[int, list[str]]:
    """(number of graph breaks, descriptions of those located in our packages)."""
    import torch._dynamo

    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    ours = []
    for reason in explained.break_reasons:
        frames = [f for f in reason.user_stack if f.filename.startswith(OUR_DIRS)]
        if frames:
            f = frames[-1]
            where = f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} ({f.name})"
            ours.append(f"{where}: {reason.reason.splitlines()[0][:120]}")
    return explained.graph_break_count, ours


def compiled_case(build, batch: dict, warmup: int, repeats: int) -> dict:
    """Eager vs compiled training step of one freshly built model."""
    eager_model, comp_model = build(), build()
    eager = B.train_step(eager_model, batch, None)
    eager()  # warm the eager path before using it as the compile-time baseline
    t0 = time.perf_counter()
    eager()
    eager_s = time.perf_counter() - t0
    compiled = B.train_step(torch.compile(comp_model), batch, None)
    t0 = time.perf_counter()
    compiled()  # traces, compiles forward and backward, runs once
    compile_s = time.perf_counter() - t0 - eager_s
    times = time_alternating({"eager": eager, "compiled": compiled}, warmup=warmup,
                             repeats=repeats)
    ms = {k: median_ms(v) for k, v in times.items()}
    n_breaks, ours = graph_breaks(eager_model, batch)
    return {"compile_s": compile_s, **ms, "breaks": n_breaks, "ours": ours}


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=REPEATS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=B.METHODS)
    p.add_argument("--with-peft", action="store_true", help="compile peft's model as well")
    args = p.parse_args()
    threads = setup(args)
    bb = B.load(QUICK_BACKBONE if args.quick else BACKBONE)
    repeats = 3 if args.quick else args.repeats
    batch = B.make_batch(bb)
    rows, found = [], []
    for method in args.methods:
        kw = {"n_virtual": N_VIRTUAL} if method in B.PROMPT_METHODS else {"r": RANK}
        sides = B.builders(bb, method, **kw)
        for side in (("ours", "peft") if args.with_peft else ("ours",)):
            try:
                r = compiled_case(sides[side], batch, args.warmup, repeats)
            except Exception as exc:
                rows.append([method, side, f"error: {type(exc).__name__}: {str(exc)[:80]}",
                             "", "", "", "", ""])
                print(" | ".join(rows[-1]), flush=True)
                continue
            if side == "ours":
                found += [f"{method}: {b}" for b in r["ours"]]
            rows.append([method, side, f"{r['compile_s']:.1f}", f"{r['eager']:.0f}",
                         f"{r['compiled']:.0f}", ratio(r["eager"], r["compiled"]),
                         str(r["breaks"]), str(len(r["ours"])) if side == "ours" else "-"])
            print(" | ".join(rows[-1]), flush=True)
            torch._dynamo.reset()
            gc.collect()
    table = markdown_table(["method", "impl", "compile s", "eager ms", "compiled ms",
                            "speed-up", "graph breaks (fwd)", "breaks in our code"], rows)
    notes = (f"Backbone: {bb.name}, {bb.source}, batch {bb.batch} x {bb.seq}, fp32, one "
             "training step (forward, backward, AdamW). Speed-up = eager / compiled median of "
             f"{repeats} alternating steps. Graph breaks from torch._dynamo.explain on the "
             "forward.\n\n" + ("Graph breaks in our code:\n" + "\n".join(f"- {f}" for f in found)
                               if found else "No graph break inside lora/ or softprompt/."))
    emit(SECTION, "torch.compile: compile time, speed-up, graph breaks", threads, table, notes,
         write=should_write(args))


if __name__ == "__main__":
    main()
