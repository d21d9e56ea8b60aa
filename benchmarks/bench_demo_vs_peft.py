"""The demo's rows trained twice, purepeft's adapter and peft's, through the same loop.

Same split, budget, seed and initial random state for both: the backbone (and a new classifier
head) is loaded after ``torch.manual_seed(seed)`` and the adapter is built right after, so both
sides draw the same initial values. Both run ``train.loop.train``; only the adapter code
differs. Reports held-out accuracy before/after, final loss and s/step, ours vs peft.

usage: python benchmarks/bench_demo_vs_peft.py [--quick] [--full] [--only lora prompt ...]
(--quick: 10 steps, 100 held-out examples, MiniLM rows only; --full: the demo's --full budget.)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import bench_args, emit, markdown_table, set_threads, should_write  # noqa: E402
from train.data import PadCollator  # noqa: E402
from train.demo import demo_rows  # noqa: E402
from train.loop import train  # noqa: E402
from train.models import load_backbone  # noqa: E402
from train.run import build_model, dataclass_replace, prepare, score  # noqa: E402

ROWS = ("prompt", "ptuning", "lora", "smollm2-lora")  # the head-only baseline has no peft form


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
                                       encoder_reparameterization_type="MLP")
    else:
        cfg = peft.LoraConfig(task_type=task, r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                              target_modules=list(m.target_modules))
    return peft.get_peft_model(backbone, cfg)


def one_side(p, model, device) -> dict:
    before = score(model, p, device)["accuracy"]
    with tempfile.TemporaryDirectory() as run_dir:
        r = train(model, p.train, PadCollator(p.tokenizer.pad_token_id), p.cfg.loop, run_dir, p.cfg.lr)
    return {"before": before, "after": score(model, p, device)["accuracy"], "loss": r.final_loss,
            "s_per_step": r.seconds_per_step}


def main() -> None:
    parser = bench_args(__doc__.split("\n")[0], repeats=1)
    parser.add_argument("--full", action="store_true", help="the demo's --full budget")
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of {ROWS}")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows = demo_rows(args.full)
    names = [n for n in ROWS if (args.only is None or n in args.only) and not (args.quick and n == "smollm2-lora")]
    device = torch.device(args.device)
    table = []
    for name in names:
        cfg = dataclass_replace(rows[name], loop={"progress": False, "device": str(device)})
        if args.quick:
            cfg = dataclass_replace(cfg, loop={"steps": 10}, data={"max_eval": 100})
        p = prepare(cfg)
        ours = one_side(p, build_model(p, device), device)
        ref = one_side(p, peft_model(p, name).to(device), device)
        table.append([name, cfg.loop.steps, f"{ours['before']:.3f} / {ref['before']:.3f}",
                      f"{ours['after']:.3f}", f"{ref['after']:.3f}", f"{100 * (ours['after'] - ref['after']):+.1f}",
                      f"{ours['loss']:.4f} / {ref['loss']:.4f}",
                      f"{ours['s_per_step']:.3f} / {ref['s_per_step']:.3f}",
                      f"{ours['s_per_step'] / ref['s_per_step']:.2f}x"])
        print(table[-1], flush=True)
    md = markdown_table(["row", "steps", "acc before ours / peft", "acc after ours", "acc after peft",
                         "diff (points)", "final loss ours / peft", "s/step ours / peft", "ours/peft time"], table)
    notes = ("Both sides: the same loop (`train.loop.train`), split, seed and initial random state; "
             "MiniLM rows score the 800 held-out snippets (100 with --quick), the SmolLM2 row the demo's "
             "held-out prompts by the two answer tokens' logits.")
    emit("demo_vs_peft", "Demo rows: purepeft vs peft accuracy (same loop, same budget)", threads, md, notes,
         device=device, write=should_write(args))


if __name__ == "__main__":
    main()
