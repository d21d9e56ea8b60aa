"""``python -m train``: argparse flags generated from the config dataclasses.

Sub-commands: ``train`` (one run), ``eval`` (score a run's adapter on its held-out split or
another data file), ``predict`` (classify texts with a classifier run, or with a causal-LM run
trained on labels), ``generate`` (write answers with a causal-LM run), ``sweep`` (a grid of runs
over knobs and seeds, with confidence intervals) and ``demo`` (every method on the bundled data,
one table). Values come from, in rising priority:
the dataclass defaults, a JSON file given with ``--config`` (``{"model": {...}, "data": {...},
"loop": {...}}``), then the flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import DataConfig, LoopConfig, ModelConfig, RunConfig

__all__ = ["main", "build_parser", "config_from_args"]

_GROUPS = (("model", ModelConfig), ("data", DataConfig), ("loop", LoopConfig))
_OPTIONAL_TYPES = {"lr": float}  # fields whose default is None: the flag's value type


def _field_help(klass) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the class source becomes its --help text."""
    helps = {}
    for line in inspect.getsource(klass).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2).replace("%", "%%")
    return helps


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for group_name, klass in _GROUPS:
        group = parser.add_argument_group(f"{group_name} ({klass.__name__})")
        helps = _field_help(klass)
        for f in dataclasses.fields(klass):
            flag = "--" + f.name.replace("_", "-")
            default = klass.__dataclass_fields__[f.name].default
            text = f"{helps.get(f.name, '')} (default: {default!r})"
            if isinstance(default, bool):
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            elif isinstance(default, tuple):
                group.add_argument(flag, dest=f.name, nargs="*", default=None, metavar="NAME", help=text)
            else:
                kind = _OPTIONAL_TYPES[f.name] if default is None else type(default)
                group.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
    parser.add_argument("--config", type=Path, help="JSON file with model/data/loop sections")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults < ``--config`` JSON < flags; raises ValueError naming a bad file, field or value."""
    base: dict = {"model": {}, "data": {}, "loop": {}}
    if getattr(args, "config", None) is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")
        try:
            loaded = json.loads(args.config.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {args.config}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object with model/data/loop sections")
        loaded = _rerun_config(loaded, args.config)
        try:
            RunConfig.from_dict(loaded)  # names unknown sections and fields, wrong types
        except ValueError as e:
            raise ValueError(f"--config {args.config}: {e}") from None
        for k, v in loaded.items():
            base[k].update(v)
    for group_name, klass in _GROUPS:
        for f in dataclasses.fields(klass):
            value = getattr(args, f.name, None)
            if value is not None:
                base[group_name][f.name] = tuple(value) if isinstance(value, list) else value
    return RunConfig.from_dict(base)


def _rerun_config(loaded: dict, path: Path) -> dict:
    """A run folder's ``config.json`` also records ``effective_lr`` (the lr the run used): it pins
    ``loop.lr`` when the file leaves it unset, so the rerun uses the same step size even if the
    method's default changes. Its ``fingerprint`` (content hashes that guard ``--resume``) is a
    record of the finished run, not a setting: it is dropped."""
    loaded = {k: v for k, v in loaded.items() if k != "fingerprint"}
    if "effective_lr" not in loaded:
        return loaded
    lr = loaded.pop("effective_lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ValueError(f"--config {path}: effective_lr={lr!r}; expected a number")
    loop = loaded.get("loop")
    if isinstance(loop, dict) and loop.get("lr") is None:
        loaded["loop"] = {**loop, "lr": float(lr)}
    return loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one adapter; writes a run folder")
    _add_config_flags(p)
    p.add_argument("--out", type=Path, help="run folder (default runs/<method>-<model>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p = sub.add_parser("eval", help="score a run's adapter on its held-out split or on --data")
    p.add_argument("run", type=Path, help="a run folder written by `train`")
    p.add_argument("--data", type=str, default=None,
                   help="score on this file / datasets folder instead of the run's held-out split")
    p = sub.add_parser("predict", help="classify texts with a run's adapter (prints label names)")
    p.add_argument("run", type=Path, help="a run folder written by `train` (a classifier, or a causal LM "
                                          "trained on labels)")
    p.add_argument("texts", nargs="+", help="texts to classify")
    p = sub.add_parser("generate", help="answer instructions with a causal-LM run's adapter")
    p.add_argument("run", type=Path, help="a causal-LM run folder written by `train`")
    p.add_argument("texts", nargs="+", help="instructions (for a run trained on labels: texts to answer)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p = sub.add_parser("sweep", help="a grid of runs (method x knobs x seeds) with mean, std and 95% CI")
    p.add_argument("spec", type=Path, help="JSON spec: base, grid and/or cells, seeds, metric (docs/sweep.md)")
    p.add_argument("--out", type=Path, required=True, help="sweep folder; rerunning into it continues a killed sweep")
    p.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process (default 1)")
    p = sub.add_parser("demo", help="every method on the bundled data; prints one table")
    p.add_argument("--out", type=Path, default=None, help="demo folder (default runs/demo-<time>)")
    p.add_argument("--full", action="store_true", help="the longer anchor budget (400 / 300 steps)")
    p.add_argument("--only", nargs="*", default=None, help="subset of rows, e.g. head lora smollm2-lora")
    return parser


def _load_run(run_dir: Path, eval_data: Optional[str] = None):
    from . import adapters
    from .run import LABELS_FILE, RUN_CONFIG, dataclass_replace, load_base, prepare
    cfg_path = run_dir / RUN_CONFIG
    if not cfg_path.is_file() or not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir} is not a finished run folder (needs {RUN_CONFIG} and adapter/)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
        raw.pop("effective_lr", None)
        raw.pop("fingerprint", None)
        cfg = RunConfig.from_dict(raw)
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{cfg_path}: {e}") from None
    if eval_data is not None:  # score another file: all of it, with the run's labels and template
        cfg = dataclass_replace(cfg, data={"eval_data": eval_data, "max_eval": 0})
    p = prepare(cfg)
    saved = run_dir / "adapter" / LABELS_FILE
    if saved.is_file() and tuple(json.loads(saved.read_text())["labels"]) != p.labels:
        raise ValueError(f"{saved} lists labels {json.loads(saved.read_text())['labels']} but the run's training "
                         f"data now gives {list(p.labels or ())}; the data changed since training")
    from .loop import resolve_device
    backbone = load_base(cfg, p.folder, p.task, resolve_device(cfg.loop.device), num_labels=p.num_labels)
    model = adapters.load_adapted(backbone, cfg.model.method, run_dir / "adapter", cfg=cfg.model)
    return cfg, p, model.eval()


def _user_turn(cfg, p, text: str) -> list[dict]:
    if p.answer_ids is not None:  # a run trained on labels: the text is the input to classify
        return [{"role": "user", "content": f"{cfg.data.instruction}\n{text}"}]
    return [{"role": "user", "content": text}]


def _predict(args) -> None:
    import torch
    from .data import BUNDLED_LABEL_WORDS
    from .templates import generation_prompt
    cfg, p, model = _load_run(args.run)
    if p.task == "causal_lm" and p.answer_ids is None:
        raise ValueError(f"{args.run} is a generative run (a causal LM trained on free-form answers); "
                         f"predict classifies: use `generate` to write answers")
    names = cfg.data.label_words or BUNDLED_LABEL_WORDS.get(cfg.data.data) or p.labels
    device = next(model.parameters()).device
    with torch.no_grad():
        for text in args.texts:
            if p.task == "seq_cls":
                enc = p.tokenizer(text, truncation=True, max_length=cfg.data.max_length, return_tensors="pt").to(device)
                label = int(model(**enc).logits.argmax(-1))
            else:  # the answer word whose first token scores highest after the prompt
                ids = torch.tensor([generation_prompt(p.tokenizer, _user_turn(cfg, p, text), p.template)], device=device)
                label = int(model(input_ids=ids).logits[0, -1, p.answer_ids].argmax())
            print(f"{names[label] if label < len(names) else label}\t{text}")


def _generate(args) -> None:
    import torch
    from .templates import generation_prompt
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}; expected >= 1")
    cfg, p, model = _load_run(args.run)
    if p.task != "causal_lm":
        raise ValueError(f"{args.run} is a classifier run ({cfg.model.method} on a sequence-classification "
                         f"head); it cannot generate text: use `predict` to classify")
    device = next(model.parameters()).device
    hf = getattr(getattr(model, "backbone", model), "config", None)
    limit = next((v for v in (getattr(hf, k, None) for k in ("max_position_embeddings", "n_positions"))
                  if isinstance(v, int) and v > 0), None)
    virtual = cfg.model.n_virtual if cfg.model.method in ("prompt", "ptuning") else 0
    with torch.no_grad():
        for text in args.texts:
            ids = generation_prompt(p.tokenizer, _user_turn(cfg, p, text), p.template)
            prompt = torch.tensor([ids], device=device)
            if limit is not None and virtual + prompt.shape[1] + args.max_new_tokens > limit:
                raise ValueError(f"--max-new-tokens {args.max_new_tokens}: with the {prompt.shape[1]} prompt tokens"
                                 f"{f' and {virtual} virtual tokens' if virtual else ''} this exceeds the model's "
                                 f"{limit} positions; use --max-new-tokens {limit - virtual - prompt.shape[1]} or less")
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=p.tokenizer.pad_token_id)
            answer = p.tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
            print(f"{p.tokenizer.decode(ids, skip_special_tokens=True)}{answer}")


def _quiet_transformers() -> None:
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_transformers()
    try:
        if args.command == "train":
            from .run import prepare, run
            cfg = config_from_args(args)
            out = args.out or Path("runs") / f"{cfg.model.method}-{Path(cfg.model.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
            if args.resume and args.out is None:
                raise ValueError("--resume needs --out (the run folder to continue)")
            summary = run(cfg, out, resume=args.resume, prepared=prepare(cfg))
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps(summary, indent=2))
                print(f"run folder: {out}")
        elif args.command == "eval":
            from .loop import resolve_device
            from .run import score
            cfg, p, model = _load_run(args.run, eval_data=args.data)
            device = resolve_device(cfg.loop.device)
            print(json.dumps(score(model, p, device), indent=2))
        elif args.command == "predict":
            _predict(args)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "sweep":
            from .sweep import format_summary, load_spec, run_sweep
            spec = load_spec(args.spec)
            summary = run_sweep(spec, args.out, workers=args.workers, progress=print)
            print(format_summary(summary, spec.metric), end="")
            print(f"sweep folder: {args.out}")
        elif args.command == "demo":
            from .demo import run_demo
            run_demo(out=args.out, full=args.full, only=args.only)
    except (ValueError, OSError, RuntimeError) as e:  # OSError: FileNotFound, FileExists, a full disk...
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
