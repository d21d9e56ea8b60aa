"""Greedy generation with a soft prompt: tokens/s, ours vs peft, KV cache on.

Both models carry the same prompt table (ours is copied into peft's), so greedy outputs must be
identical: the script checks that before timing. EOS is set to an id no model emits, so every
run decodes exactly NEW_TOKENS tokens. Candidates alternate in one process; medians.

    python benchmarks/bench_generate.py          # SmolLM2-135M, batch 1 and 4
    python benchmarks/bench_generate.py --quick  # tiny random Llama
"""
from __future__ import annotations

import gc

import torch

import _backbones as B
from _common import (bench_args, emit, markdown_table, median_ms, ratio, setup,
                     should_write, time_alternating)

# ---------------------------------------------------------------------------------- knobs
BACKBONE = "smollm2"
QUICK_BACKBONE = "tiny-llama"
BATCHES = (1, 4)
PROMPT_LEN = 32   # real input tokens
NEW_TOKENS = 32   # generated tokens per row
N_VIRTUAL = 20
REPEATS = 5
SECTION = "generate"


def models(bb: B.Backbone, device: str = "cpu"):
    """Ours and peft's prompt-tuned models with the same prompt table, in eval mode."""
    ours = B.ours(bb, "prompt", n_virtual=N_VIRTUAL, device=device).eval()
    ref = B.reference(bb, "prompt", n_virtual=N_VIRTUAL, device=device).eval()
    with torch.no_grad():  # one shared table, so greedy outputs can be compared token by token
        ref.prompt_encoder["default"].embedding.weight.copy_(ours.prompt().detach())
    return ours, ref


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=REPEATS)
    args = p.parse_args()
    threads = setup(args)
    bb = B.load(QUICK_BACKBONE if args.quick else BACKBONE)
    repeats = 3 if args.quick else args.repeats
    ours, ref = models(bb, args.device)
    never = bb.vocab + 7  # an EOS id outside the vocabulary: decoding never stops early
    rows = []
    for batch in BATCHES:
        ids = B.fixed_ids(bb.vocab, batch, PROMPT_LEN, seed=batch).to(args.device)
        mask = torch.ones_like(ids)

        def run_ours():
            return ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=never, pad_token_id=0)

        def run_peft():
            with torch.no_grad():
                return ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                                    eos_token_id=never, pad_token_id=0)

        a, b = run_ours(), run_peft()
        same = "yes" if a.shape == b.shape and torch.equal(a, b) else "NO"
        times = time_alternating({"ours": run_ours, "peft": run_peft}, warmup=args.warmup,
                                 repeats=repeats, device=args.device)
        ms = {k: median_ms(v) for k, v in times.items()}
        tps = {k: batch * NEW_TOKENS / (v / 1000) for k, v in ms.items()}
        rows.append([bb.name, str(batch), f"{tps['ours']:.1f}", f"{tps['peft']:.1f}",
                     ratio(tps["ours"], tps["peft"]), same])
        print(" | ".join(rows[-1]), flush=True)
        gc.collect()
    table = markdown_table(["backbone", "batch", "ours tok/s", "peft tok/s",
                            "speed ours/peft", "same tokens"], rows)
    notes = (f"Backbone: {bb.name}, {bb.source}. {N_VIRTUAL} virtual tokens, {PROMPT_LEN} input "
             f"tokens, {NEW_TOKENS} new tokens per row, greedy, KV cache on, fp32. tok/s counts "
             f"generated tokens over the whole call (prefill included). Median of {repeats} "
             f"alternating calls after {args.warmup} warm-up. Higher is better; target >= 1.0x.")
    on_gpu = args.device != "cpu"
    emit(SECTION + ("-gpu" if on_gpu else ""),
         "Generation with a soft prompt" + (" (GPU)" if on_gpu else ""), threads, table, notes,
         device=args.device, write=should_write(args))


if __name__ == "__main__":
    main()
