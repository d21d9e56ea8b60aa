"""LoRA training step vs the frozen floor: the physical lower bound of any adapter step.

Floor = the same frozen backbone, no adapter, forward + backward down to the input embeddings
(every activation gradient a LoRA step needs, no weight gradient). A LoRA step can only add to
it: the adapter matmuls and their gradients, plus AdamW on the adapter. Ours, peft and the
floor run alternately in one process on one fixed batch; medians.

    python benchmarks/bench_floor.py           # MiniLM 16x64, fp32 + bf16 autocast
    python benchmarks/bench_floor.py --full    # + SmolLM2-135M 4x128
    python benchmarks/bench_floor.py --quick   # tiny random models
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
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
RANK = 8
REPEATS = 7
SECTION = "floor"


def floor_step(bb: B.Backbone, batch: dict, amp, device: str = "cpu") -> callable:
    """Forward + backward of the frozen backbone to its input embeddings; no weight grads."""
    model = bb.fresh().to(device).train()
    embed = model.get_input_embeddings()
    rest = {k: v for k, v in batch.items() if k != "input_ids"}

    def step() -> None:
        # (B, T, d) leaf that wants a gradient: backward walks the whole network down to it
        x = embed(batch["input_ids"]).detach().requires_grad_(True)
        with torch.autocast(torch.device(device).type, dtype=amp or torch.bfloat16,
                            enabled=amp is not None):
            loss = model(inputs_embeds=x, **rest).loss
        loss.backward()

    return step


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=REPEATS)
    p.add_argument("--full", action="store_true", help="also SmolLM2-135M (4 x 128)")
    p.add_argument("--backbones", nargs="+", choices=list(B.BACKBONES), help="overrides --full")
    args = p.parse_args()
    threads = setup(args)
    names = (args.backbones or (QUICK_BACKBONES if args.quick else
                                FULL_BACKBONES if args.full else BACKBONES))
    repeats = 3 if args.quick else args.repeats
    for name in names:  # one docs section per backbone, written as soon as it is done
        bb = B.load(name)
        rows, sources = [], [f"{name}: {bb.source}, batch {bb.batch} x {bb.seq}"]
        dev = args.device
        batch = B.make_batch(bb, device=dev)
        for prec, amp in PRECISIONS.items():
            steps = {"floor": floor_step(bb, batch, amp, dev)}
            try:
                steps["ours"] = B.train_step(B.ours(bb, "lora", r=RANK, device=dev), batch, amp)
            except Exception as exc:
                print(f"ours unavailable: {type(exc).__name__}: {exc}")
            steps["peft"] = B.train_step(B.reference(bb, "lora", r=RANK, device=dev), batch, amp)
            times = time_alternating(steps, warmup=args.warmup, repeats=repeats, device=dev)
            ms = {k: median_ms(v) for k, v in times.items()}
            o = ms.get("ours", float("nan"))
            rows.append([name, prec, f"{ms['floor']:.0f}", f"{o:.0f}", f"{ms['peft']:.0f}",
                         ratio(o, ms["floor"]), ratio(ms["peft"], ms["floor"]),
                         ratio(o, ms["peft"])])
            print(" | ".join(rows[-1]), flush=True)
            del steps
            gc.collect()
        table = markdown_table(["backbone", "precision", "floor ms", "ours LoRA ms", "peft LoRA ms",
                                "ours/floor", "peft/floor", "ours/peft"], rows)
        notes = ("Backbone " + "; ".join(sources) + f". LoRA r={RANK}, alpha={2 * RANK}, dropout 0 "
                 "on query/value (q_proj/v_proj); a LoRA step includes AdamW and zero_grad. Median of "
                 f"{repeats} alternating rounds after {args.warmup} warm-up. Targets: ours/floor <= "
                 "1.03x, ours/peft <= 0.95x.")
        on_gpu = args.device != "cpu"
        emit(section_name(SECTION, name, args.device),
             f"LoRA step vs the frozen floor: {name}" + (" (GPU)" if on_gpu else ""), threads, table, notes,
             device=args.device, write=should_write(args))


if __name__ == "__main__":
    main()
