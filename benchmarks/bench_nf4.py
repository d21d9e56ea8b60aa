"""NF4 on CPU: ours (lora.nf4, pure PyTorch) vs bitsandbytes' CPU kernels, in one process.

Cases: quantize and dequantize a 4096x4096 weight (NF4, blocksize 64, with and without double
quantization), an NF4 linear forward+backward (grad to the input) at batch 8 x 512 tokens in
fp32 and bf16 compute, and one QLoRA training step on SmolLM2-135M shapes (batch 8 x 96, fp32,
LoRA r8 on q_proj/v_proj) against peft + bitsandbytes Linear4bit. Candidates alternate every
round; medians; ratio = ours / bitsandbytes time (below 1.00x: ours is faster).

    python benchmarks/bench_nf4.py            # ~2-4 min on 2 cores, writes its docs section
    python benchmarks/bench_nf4.py --threads 1 --clock cpu   # steadier on a shared machine
    python benchmarks/bench_nf4.py --quick    # smaller shapes, no docs update
"""
from __future__ import annotations

import gc
import warnings

import torch

from _common import (bench_args, emit, markdown_table, median_ms, ratio, setup, should_write,
                     time_alternating)

# ---------------------------------------------------------------------------------- knobs
SIZE = 4096            # weight is SIZE x SIZE
BLOCKSIZE = 64
TOKENS = (8, 512)      # batch x sequence for the linear forward+backward
STEP_SHAPE = (8, 96)   # batch x sequence for the QLoRA training step
NAME = "nf4"


def _bnb_pair(w: torch.Tensor, double_quant: bool):
    import bitsandbytes.functional as bnbF
    return bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4",
                              compress_statistics=double_quant)


def _bnb_linear(w: torch.Tensor, compute_dtype: torch.dtype):
    import bitsandbytes as bnb
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=compute_dtype,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=BLOCKSIZE).to("cpu")
    return layer.train()  # train mode: bitsandbytes' eval CPU path repacks the weight


def kernel_rows(size: int, tokens: tuple, repeats: int, warmup: int) -> list[list[str]]:
    import bitsandbytes.functional as bnbF
    from lora.nf4 import dequantize_nf4, quantize_nf4
    from lora.nf4_linear import NF4Linear

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(size, size, generator=gen) * 0.02
    rows = []

    def add(case, fns, reps=repeats):
        t = time_alternating(fns, warmup=warmup, repeats=reps)
        ours = median_ms(t["ours"])
        ref = median_ms(t["bnb"]) if "bnb" in t else None
        rows.append([case, f"{ours:.1f}", "n/a" if ref is None else f"{ref:.1f}",
                     "n/a" if ref is None else ratio(ours, ref)])
        print(rows[-1], flush=True)

    add(f"quantize {size}x{size} NF4+DQ",
        {"ours": lambda: quantize_nf4(w, BLOCKSIZE, True), "bnb": lambda: _bnb_pair(w, True)},
        reps=max(3, repeats // 3))
    for dq in (False, True):
        packed, state = quantize_nf4(w, BLOCKSIZE, dq)
        ref_packed, ref_state = _bnb_pair(w, dq)
        for dtype in (torch.float32, torch.bfloat16):
            if dq and dtype == torch.bfloat16:
                continue
            add(f"dequantize {size}x{size} -> {str(dtype)[6:]}{' (DQ)' if dq else ''}",
                {"ours": lambda: dequantize_nf4(packed, state, dtype),
                 "bnb": lambda: bnbF.dequantize_4bit(ref_packed, ref_state, quant_type="nf4"
                                                     ).to(dtype) if dtype == torch.float32
                 else bnbF.dequantize_4bit(ref_packed, _with_dtype(ref_state, dtype))})
        if not dq:  # the same work without a fresh 64 MiB allocation (and its page faults)
            buf = torch.empty(size, size)
            add(f"dequantize {size}x{size} -> float32, out= reused buffer (ours only)",
                {"ours": lambda: dequantize_nf4(packed, state, out=buf)})
            del buf
    del packed, ref_packed
    for dtype in (torch.float32, torch.bfloat16):
        ours = NF4Linear.from_linear(_as_linear(w), BLOCKSIZE, True, compute_dtype=dtype)
        ref = _bnb_linear(w, dtype)
        x = torch.randn(*tokens, size, generator=gen, dtype=dtype).requires_grad_(True)
        g = torch.randn(*tokens, size, generator=gen, dtype=dtype)

        def fwd_bwd(layer):
            x.grad = None
            layer(x).backward(g)

        add(f"NF4 linear fwd+bwd {tokens[0]}x{tokens[1]} tokens, {str(dtype)[6:]}",
            {"ours": lambda: fwd_bwd(ours), "bnb": lambda: fwd_bwd(ref)},
            reps=max(3, repeats // 3))
        del ours, ref, x, g
        gc.collect()
    return rows


def _as_linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    return lin


def _with_dtype(state, dtype):
    import copy
    state = copy.copy(state)
    state.dtype = dtype
    return state


def step_row(quick: bool, repeats: int, warmup: int) -> list[str]:
    from _backbones import load, ours, reference, train_step, make_batch
    bb = load("tiny-llama" if quick else "smollm2", *(None, None) if quick else STEP_SHAPE)
    batch = make_batch(bb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fns = {"ours": train_step(ours(bb, "qlora"), batch, None),
               "bnb": train_step(reference(bb, "qlora"), batch, None)}
    t = time_alternating(fns, warmup=warmup, repeats=max(3, repeats // 3))
    o, r = median_ms(t["ours"]), median_ms(t["bnb"])
    row = [f"QLoRA step {bb.name} {bb.batch}x{bb.seq} fp32 (vs peft+bnb)", f"{o:.1f}", f"{r:.1f}",
           ratio(o, r)]
    print(row, flush=True)
    return row


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=9)
    args = p.parse_args()
    threads = setup(args)
    size, tokens = (1024, (2, 64)) if args.quick else (SIZE, TOKENS)
    rows = kernel_rows(size, tokens, args.repeats, args.warmup)
    rows.append(step_row(args.quick, args.repeats, args.warmup))
    table = markdown_table(["case", "ours ms", "bitsandbytes ms", "ours/bnb"], rows)
    notes = ("bitsandbytes CPU: C++ kernels for dequantization, pure-torch quantize; its Linear4bit "
             "in train mode (dequantize + F.linear, like ours). Ours: a 256-entry byte -> code-pair "
             "lookup (one 8-byte gather per byte) in L2-sized chunks, times the block absmax in "
             "fp32 (a 16-bit output gets one rounding copy); a fresh output of >= 4 MiB is "
             "advised to use transparent huge pages before its first write (lora/nf4_alloc.py), "
             "which removes most of the page-fault cost of a new 64 MiB tensor. The `out=` row "
             "shows our dequantization into a reused buffer (bitsandbytes' CPU backend has no "
             "`out=` kernel). The linear rows are dominated by the two 4096-token matmuls.")
    emit(NAME, "NF4 kernels on CPU: ours vs bitsandbytes", threads, table, notes,
         write=should_write(args))


if __name__ == "__main__":
    main()
