"""Tiny model folders, data files and finished runs for the CLI fault tests, plus snapshots.

``snapshot`` records every path under some roots with its bytes and mode, so a test can assert
that a refused command wrote, changed or removed nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.models import tiny_bert_classifier, tiny_causal_lm, tiny_tokenizer

TEXTS = ["the movie was great", "a dull , boring film", "wonderful acting", "far too long"]


def build_folders(root: Path) -> Path:
    """``tiny-llama/``, ``tiny-bert/`` (with tokenizers), ``reviews.csv`` (20 rows), ``chat.jsonl``
    (12 records) and ``long.csv`` (rows longer than the tiny models' 64 positions) under ``root``."""
    llama, bert = root / "tiny-llama", root / "tiny-bert"
    tiny_causal_lm("llama").save_pretrained(llama)
    tiny_bert_classifier(num_labels=2).save_pretrained(bert)
    for folder in (llama, bert):
        tiny_tokenizer().save_pretrained(folder)
    rows = "".join(f'"{t} {i}",{i % 2}\n' for i, t in enumerate(TEXTS * 5))
    (root / "reviews.csv").write_text("text,label\n" + rows)
    items = [{"instruction": "Say hello", "input": t, "output": "hello world"} for t in TEXTS * 3]
    (root / "chat.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    long_rows = "".join(f'"{" ".join([t] * 30)}",{i % 2}\n' for i, t in enumerate(TEXTS * 3))
    (root / "long.csv").write_text("text,label\n" + long_rows)
    return root


def train_argv(out: Path, *flags: str) -> list[str]:
    """A fast ``train`` command line (3 steps of 2 examples, no progress bar)."""
    return ["train", "--steps", "3", "--batch-size", "2", "--log-every", "1", "--no-progress",
            "--out", str(out), *flags]


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: path -> (mode, bytes or None for folders)."""
    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in sorted([root, *root.rglob("*")]):
            out[str(p)] = (p.stat().st_mode, None if p.is_dir() else p.read_bytes())
    return out


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a finished run folder (to corrupt)."""
    shutil.copytree(src, dst)
    return dst
