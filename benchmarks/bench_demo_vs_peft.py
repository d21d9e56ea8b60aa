"""Method comparison on the bundled tasks: every demo row trained by purepeft and by peft through
the same loop, with the same seeds, run for run.

For each row and seed both sides start from the same seeded state: the backbone (and a new
classifier head) is loaded after ``torch.manual_seed(seed)`` and the adapter is built right
after, so both draw the same initial values; both run ``train.loop.train``, only the adapter
code differs. Per row: held-out accuracy mean ± std over the seeds for each side, whether the
two sides ended equal run for run (accuracy and final loss), trainable parameters, adapter file
size, s/step and the peak memory of one training step (torch allocations above the level before).

usage: python benchmarks/bench_demo_vs_peft.py [--seeds 0 1 2] [--full] [--only lora prompt ...] [--quick]
(--quick: 10 steps, 100 held-out examples, one seed, MiniLM rows only; --full: the demo's --full budget.)
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from benchmarks._common import (BENCH_DOC, bench_args, emit, markdown_table, mib, peak_memory,  # noqa: E402
                                section_text, set_threads, should_write)
from train.adapters import adapter_bytes, save_adapted  # noqa: E402
from train.data import PadCollator  # noqa: E402
from train.demo import demo_rows  # noqa: E402
from train.loop import train  # noqa: E402
from train.models import load_backbone  # noqa: E402
from train.run import build_model, dataclass_replace, prepare, score  # noqa: E402

ROWS = ("prompt", "ptuning", "prefix", "lora", "qlora", "ia3", "smollm2-lora")  # the head-only baseline has no peft form
SECTION = "demo_vs_peft"
COLUMNS = ["row", "steps", "seeds", "acc ours (mean ± std)", "acc peft (mean ± std)", "equal run for run",
           "trainable ours / peft", "adapter KB ours / peft", "s/step ours / peft", "step MiB ours / peft",
           "measured"]


def peft_model(p, row: str):
    """peft's version of a demo row, built from the same seeded state as ours."""
    import peft
    m = p.cfg.model
    torch.manual_seed(p.cfg.loop.seed)
    backbone = load_backbone(p.folder, p.task, num_labels=p.num_labels)
    task = peft.TaskType.SEQ_CLS if p.task == "seq_cls" else peft.TaskType.CAUSAL_LM
    if m.method == "prompt":
        cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=m.n_virtual)
    elif m.method == "ptuning":
        cfg = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=m.n_virtual,
                                       encoder_reparameterization_type=m.encoder.upper(),
                                       encoder_hidden_size=m.encoder_hidden or None)
    elif m.method == "prefix":
        cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=m.n_virtual,
                                      prefix_projection=m.prefix_projection,
                                      encoder_hidden_size=m.encoder_hidden or None)
    elif m.method == "ia3":  # peft's defaults for the model type, as ours
        cfg = peft.IA3Config(task_type=task)
    else:
        if m.method == "qlora":
            from benchmarks._backbones import bnb_quantize
            bnb_quantize(backbone, ("classifier", "score", "lm_head"))
        cfg = peft.LoraConfig(task_type=task, r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                              target_modules=list(m.target_modules))
    return peft.get_peft_model(backbone, cfg)


def _step_memory(model, p, device) -> int:
    """Peak bytes allocated by one training step on the first training batch."""
    batch = {k: v.to(device) for k, v in PadCollator(p.tokenizer.pad_token_id)(p.train[:p.cfg.loop.batch_size]).items()}
    params = [q for q in model.parameters() if q.requires_grad]

    def step():
        model(**batch).loss.backward()
        for q in params:
            q.grad = None
    return peak_memory(step, device)


def one_side(p, model, device, save) -> dict:
    before = score(model, p, device)["accuracy"]
    memory = _step_memory(model, p, device)
    with tempfile.TemporaryDirectory() as run_dir:
        r = train(model, p.train, PadCollator(p.tokenizer.pad_token_id), p.cfg.loop, run_dir, p.cfg.lr)
        size = adapter_bytes(save(model, Path(run_dir) / "adapter"))
    return {"before": before, "after": score(model, p, device)["accuracy"], "loss": r.final_loss,
            "s_per_step": r.seconds_per_step, "memory": memory, "bytes": size,
            "trainable": sum(q.numel() for q in model.parameters() if q.requires_grad)}


def _ms(xs) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    parser = bench_args(__doc__.split("\n")[0], repeats=1)
    parser.add_argument("--full", action="store_true", help="the demo's --full budget")
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of {ROWS}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    threads = set_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows = demo_rows(args.full)
    names = [n for n in ROWS if n in rows and (args.only is None or n in args.only)
             and not (args.quick and n.startswith("smollm2"))]
    seeds = args.seeds[:1] if args.quick else args.seeds
    device = torch.device(args.device)
    table = []
    for name in names:
        runs = {"ours": [], "peft": []}
        for seed in seeds:
            cfg = dataclass_replace(rows[name], loop={"progress": False, "device": str(device), "seed": seed})
            if args.quick:
                cfg = dataclass_replace(cfg, loop={"steps": 10}, data={"max_eval": 100})
            p = prepare(cfg)
            runs["ours"].append(one_side(p, build_model(p, device), device,
                                         lambda m, f: save_adapted(m, cfg.model.method, f)))
            runs["peft"].append(one_side(p, peft_model(p, name).to(device), device,
                                         lambda m, f: (m.save_pretrained(f), f)[1]))
            print(name, seed, {k: v[-1] for k, v in runs.items()}, flush=True)
        o, r = runs["ours"], runs["peft"]
        equal = all(a["after"] == b["after"] and a["loss"] == b["loss"] for a, b in zip(o, r))
        table.append([name, cfg.loop.steps, len(seeds), _ms([x["after"] for x in o]), _ms([x["after"] for x in r]),
                      "yes" if equal else "no", f"{o[0]['trainable']:,} / {r[0]['trainable']:,}",
                      f"{o[0]['bytes'] / 1024:,.1f} / {r[0]['bytes'] / 1024:,.1f}",
                      f"{statistics.median(x['s_per_step'] for x in o):.3f} / "
                      f"{statistics.median(x['s_per_step'] for x in r):.3f}",
                      f"{mib(o[0]['memory'])} / {mib(r[0]['memory'])}",
                      time.strftime("%m-%d %H:%M UTC", time.gmtime()) + f", {threads} thr"])
        print(table[-1], flush=True)
        _emit(table, threads, device, args)  # after every row: a stopped run keeps the rows it finished


def kept_rows(text: str, replaced) -> list[list[str]]:
    """The rows of the docs table in `text` that this invocation does not re-measure (by row name).

    Only rows with the current columns are kept: a table from an older layout is dropped whole.
    """
    rows = []
    for line in section_text(text, SECTION).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if (line.startswith("| ") and len(cells) == len(COLUMNS) and cells[0] in ROWS
                and cells[0] not in replaced):
            rows.append(cells)
    return rows


def merged(table: list, text: str) -> list:
    """This invocation's rows plus the kept ones, in ROWS order."""
    rows = table + kept_rows(text, {r[0] for r in table})
    return sorted(rows, key=lambda r: ROWS.index(r[0]))


def _emit(table: list, threads: int, device, args) -> None:
    write = should_write(args)
    if write and BENCH_DOC.exists():
        table = merged(table, BENCH_DOC.read_text(encoding="utf-8"))
    md = markdown_table(COLUMNS, table)
    notes = ("Both sides: the same loop (`train.loop.train`), split, seeds and initial random state. "
             "'equal run for run' = for every seed, the same held-out accuracy and the same final logged "
             "loss, compared exactly. MiniLM rows score the bundled held-out snippets, the SmolLM2 row the "
             "demo's held-out prompts by the two answer tokens' logits. The adapter file is our folder's "
             "safetensors vs peft's `save_pretrained` (P-Tuning: ours also stores the encoder, peft only "
             "the prompt table). qlora's peft side is bitsandbytes Linear4bit + peft LoRA; ia3's is "
             "peft's IA3Config defaults for the model type (ours uses the same table); the bitsandbytes "
             "reference keeps its one CPU path (no AVX512-BF16 repacking in eval mode, which would break "
             "its training afterwards). 'step MiB' runs the model's own full-logits forward on both "
             "sides; the training runs (accuracy, s/step) use the loop's labelled-only loss on both "
             "sides. Rows come from separate invocations (`--only ROW ...`; the header is the latest "
             "one's): compare s/step within a row, not across rows measured at other times.")
    emit(SECTION, "Method comparison: purepeft vs peft, same loop, same seeds", threads, md, notes,
         device=device, write=write, show=False)
    print(md, flush=True)


if __name__ == "__main__":
    main()
