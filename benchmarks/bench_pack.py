"""Training tokens/s: padded random batches vs length-grouped batches vs packed rows.

SmolLM2-135M-Instruct with LoRA (r 8 on q_proj, v_proj) on the bundled Rotten Tomatoes data as
an instruct task, rendered with the tokenizer's chat template (the default) and with the seed
template. One step = forward + backward + AdamW on the next batch of its scheme:

- padded: 8 examples in shuffled order, padded to the longest (``PadCollator``);
- grouped: 8 examples of similar length (``grouped_batches``);
- packed: rows of ``MAX_LENGTH`` tokens filled with whole examples (``pack_examples``), as many
  rows per batch as hold about the tokens of 8 examples; attention stays inside each example.

Tokens/s counts real tokens only (no padding), summed over the timed steps; the schemes run
alternately in one process on the same model. "padding bound" = positions / real tokens of the
padded batches: what removing all padding could gain at equal cost per position.

    python benchmarks/bench_pack.py              # SmolLM2, bf16 autocast (a few minutes on 2 cores)
    python benchmarks/bench_pack.py --quick      # fewer steps, no docs write
"""
from __future__ import annotations

import torch

from _common import bench_args, emit, markdown_table, setup, should_write, time_alternating

# ---------------------------------------------------------------------------------- knobs
BATCH = 8            # examples per padded / grouped batch (the demo's SmolLM2 batch)
MAX_LENGTH = 256     # packed row capacity (and the truncation length of every example)
MAX_TRAIN = 800      # training examples encoded (batches are drawn from these)
REPEATS = 8          # timed steps per scheme
PRECISION = "bf16"   # autocast dtype over the fp32 model, as the demo's default budget
TEMPLATES = ("chat", "seed")  # the tokenizer's own (the default for SmolLM2-Instruct), then "Human: ..."
SECTION = "pack"


def measure(p, model, args, repeats: int, table_rows: list) -> str:
    """Time the three schemes on one encoding of the data; appends table rows, returns a note."""
    from train.data import PadCollator
    from train.packing import PackCollator, disable_cache, grouped_batches, pack_examples

    disable_cache(model)  # the same forward for every scheme (packing needs it off)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    amp = {"bf16": torch.bfloat16, "fp32": None}[PRECISION]
    examples, pad = p.train, p.tokenizer.pad_token_id
    lengths = [len(e["input_ids"]) for e in examples]
    n = args.warmup + repeats
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    padded = [PadCollator(pad)([examples[i] for i in order[k * BATCH:(k + 1) * BATCH]]) for k in range(n)]
    grouped = [PadCollator(pad)([examples[i] for i in b]) for b in grouped_batches(lengths, BATCH, 0, 0)[:n]]
    rows = pack_examples(examples, MAX_LENGTH)
    per = max(1, round(BATCH * sum(lengths) / len(lengths) / MAX_LENGTH))  # rows holding ~8 examples' tokens
    row_order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = [[rows[i] for i in row_order[k * per:(k + 1) * per]] for k in range(n)]
    schemes = {"padded": padded, "grouped": grouped, "packed": [PackCollator(pad)(c) for c in chunks]}
    real = {"padded": [int(b["attention_mask"].sum()) for b in padded],
            "grouped": [int(b["attention_mask"].sum()) for b in grouped],
            "packed": [sum(len(r["input_ids"]) for r in c) for c in chunks]}
    done = {k: 0 for k in schemes}

    def stepper(name: str):
        def step() -> None:
            batch = {k: v.to(args.device) for k, v in schemes[name][done[name] % n].items()}
            done[name] += 1
            with torch.autocast(torch.device(args.device).type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    times = time_alternating({k: stepper(k) for k in schemes}, warmup=args.warmup, repeats=repeats,
                             device=args.device)
    rate, share = {}, {}
    for name, batches in schemes.items():
        timed = batches[args.warmup:n]
        tokens = sum(real[name][args.warmup:n])
        slots = sum(b["input_ids"].numel() for b in timed)
        rate[name], share[name] = tokens / sum(times[name]), tokens / slots
        table_rows.append([p.template, name, f"{timed[0]['input_ids'].shape[0]}", f"{slots / len(timed):.0f}",
                           f"{100 * share[name]:.0f}%", f"{1000 * sum(times[name]) / len(timed):.0f}",
                           f"{rate[name]:.0f}", f"{rate[name] / rate['padded']:.2f}x",
                           f"{1 / share['padded']:.2f}x"])
    mean = sum(lengths) / len(lengths)
    return (f"{p.template}: {len(examples)} examples (mean {mean:.0f}, max {max(lengths)} tokens) -> {len(rows)} "
            f"packed rows of <= {MAX_LENGTH}")


def main() -> None:
    parser = bench_args(__doc__.split("\n\n")[0], repeats=REPEATS, warmup=1)
    args = parser.parse_args()
    threads = setup(args)
    repeats = 3 if args.quick else args.repeats

    from train.config import DataConfig, LoopConfig, ModelConfig, RunConfig
    from train.run import build_model, prepare

    model, table_rows, notes = None, [], []
    for template in TEMPLATES:
        cfg = RunConfig(ModelConfig(method="lora", model="smollm2", lora_r=8, lora_alpha=16,
                                    target_modules=("q_proj", "v_proj")),
                        DataConfig(data="rotten_tomatoes", task="instruct", template=template, max_length=MAX_LENGTH,
                                   max_train=MAX_TRAIN),
                        LoopConfig(seed=0, device=args.device))
        p = prepare(cfg)
        if model is None:
            model = build_model(p, torch.device(args.device))
        notes.append(measure(p, model, args, repeats, table_rows))
    table = markdown_table(["template", "scheme", "rows/step", "positions/step", "real tokens", "ms/step",
                            "tokens/s", "vs padded", "padding bound"], table_rows)
    text = (f"SmolLM2-135M-Instruct, LoRA r 8 q_proj/v_proj, {PRECISION} autocast; " + "; ".join(notes) +
            f". {repeats} timed steps per scheme after {args.warmup} warm-up, alternating. "
            f"`python benchmarks/bench_pack.py`.")
    emit(SECTION, "Packing and length grouping (training tokens/s)", threads, table, text,
         device=args.device, write=should_write(args))


if __name__ == "__main__":
    main()
