"""Data: reading records, the chat template, tokenization with -100 prompt labels, padding.

Two record shapes:
- classification: ``{"text": str, "label": int}`` from a CSV with columns ``text,label``
  (optionally ``split`` = train | test);
- instruction: ``{"instruction": str, "input": str, "output": str}`` from Alpaca-style JSON
  (a list) or JSONL (one object a line).

Instruction examples use the chat template ``"Human: {instruction}\\n{input}".strip() +
"\\n\\nAssistant: "`` followed by the output and the eos token; only the output and eos carry
labels, every prompt position is -100.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["BUNDLED_DATA", "IGNORE_INDEX", "DataError", "resolve_data", "read_records",
           "split_records", "format_prompt", "encode_instruction", "encode_text",
           "classification_to_instruction", "PadCollator"]

IGNORE_INDEX = -100  # label value that cross-entropy skips
BUNDLED_DATA = {"rotten_tomatoes": Path(__file__).parent / "data" / "rotten_tomatoes.csv"}
_INSTRUCT_FIELDS = ("instruction", "output")  # "input" is optional (empty when absent)


class DataError(ValueError):
    """A data file that cannot be used as asked; the message names the file and the problem."""


def resolve_data(name_or_path: str) -> Path:
    """A bundled data name (``rotten_tomatoes``) or a file path -> an existing file."""
    if name_or_path in BUNDLED_DATA:
        return BUNDLED_DATA[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise DataError(f"--data {name_or_path!r} is neither a bundled name {sorted(BUNDLED_DATA)} "
                        f"nor an existing file")
    return path


def _read_csv(path: Path, num_labels: int) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in ("text", "label") if c not in cols]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {cols}, expected text,label")
        records = []
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: label {row['label']!r} is not an integer") from None
            if not 0 <= label < num_labels:
                raise DataError(f"{path}:{line}: label {label} is outside the label set "
                                f"0..{num_labels - 1}")
            rec = {"text": row["text"] or "", "label": label}
            if row.get("split"):
                rec["split"] = row["split"]
            records.append(rec)
    return records


def _read_instructions(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = []
        for line, raw in enumerate(text.splitlines(), start=1):
            if raw.strip():
                try:
                    items.append(json.loads(raw))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line}: not valid JSON ({e.msg})") from None
    else:
        try:
            items = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
    records = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: record {i} is a {type(item).__name__}, expected an object")
        missing = [k for k in _INSTRUCT_FIELDS if not isinstance(item.get(k), str)]
        if missing:
            raise DataError(f"{path}: record {i} lacks string field(s) {missing}; "
                            f"expected instruction, input (optional), output")
        rec = {"instruction": item["instruction"], "input": item.get("input") or "",
               "output": item["output"]}
        if item.get("split"):
            rec["split"] = item["split"]
        records.append(rec)
    return records


def read_records(path: Path, num_labels: int = 2) -> list[dict]:
    """Read a CSV (classification) or JSON/JSONL (instruction) file into a list of dicts.

    Args:
        path: the file; the suffix picks the reader (.csv, .json, .jsonl).
        num_labels: classification labels must be integers in [0, num_labels).
    Returns:
        The records, in file order.
    Raises:
        DataError: unknown suffix, not UTF-8, empty file, missing fields, labels outside the label set.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix == ".csv":
            records = _read_csv(path, num_labels)
        elif path.suffix in (".json", ".jsonl"):
            records = _read_instructions(path)
        else:
            raise DataError(f"{path}: unknown suffix {path.suffix!r}; expected .csv, .json or .jsonl")
    except UnicodeDecodeError:  # e.g. a Latin-1 file: say where, rather than guess an encoding
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
            raise
        except UnicodeDecodeError as e:  # offsets in the whole file, not in a decoder chunk
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: byte {raw[e.start:e.start + 1]!r} at offset {e.start} is not UTF-8; "
                            f"expected a UTF-8 file (convert it, e.g. iconv -f latin1 -t utf-8)") from None
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train / held-out lists: the ``split`` field when present, else a seeded random split."""
    if any("split" in r for r in records):
        train = [r for r in records if r.get("split", "train") == "train"]
        held = [r for r in records if r.get("split", "train") != "train"]
    else:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(records) * eval_fraction))
        held = [records[i] for i in order[:n_eval]]
        train = [records[i] for i in order[n_eval:]]
    if not train or not held:
        raise DataError(f"split gives {len(train)} train and {len(held)} held-out records; need both")
    return train, held


def format_prompt(instruction: str, input: str = "") -> str:
    """The chat template's prompt: ``"Human: {instruction}\\n{input}".strip() + "\\n\\nAssistant: "``."""
    return f"Human: {instruction}\n{input}".strip() + "\n\nAssistant: "


def classification_to_instruction(records: list[dict], instruction: str,
                                  label_words: Sequence[str]) -> list[dict]:
    """Turn ``{"text", "label"}`` records into instruction records answering with a label word."""
    return [{"instruction": instruction, "input": r["text"], "output": label_words[r["label"]],
             "label": r["label"]} for r in records]


def encode_instruction(tokenizer, record: dict, max_length: int) -> dict:
    """Token ids and labels of one instruction record.

    The prompt is tokenized with the tokenizer's special tokens (a BOS when it adds one), the
    output without them, then eos is appended; prompt and answer are tokenized apart so the
    label boundary is exact. The joined sequence is cut to ``max_length`` from the right.

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "prompt_len": int}`` with labels -100
        on every prompt position.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; the instruction template needs one")
    prompt_ids = tokenizer(format_prompt(record["instruction"], record.get("input", "")))["input_ids"]
    answer_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels, "prompt_len": min(len(prompt_ids), max_length)}


def encode_text(tokenizer, record: dict, max_length: int) -> dict:
    """Token ids (and token types when the tokenizer makes them) plus the integer label."""
    enc = tokenizer(record["text"], truncation=True, max_length=max_length)
    out = {"input_ids": list(enc["input_ids"]), "labels": int(record["label"])}
    if "token_type_ids" in enc:
        out["token_type_ids"] = list(enc["token_type_ids"])
    return out


@dataclass(frozen=True)
class PadCollator:
    """Pads a list of encoded examples into a batch of tensors.

    Args:
        pad_id: id written into padded ``input_ids`` positions.
        side: "right" (training) or "left" (batched generation).
    Returns (when called):
        ``input_ids``/``attention_mask`` (B, T) and, when present, ``token_type_ids`` (B, T)
        and ``labels`` ((B, T) padded with -100, or (B,) for classification).
    """
    pad_id: int
    side: str = "right"

    def __post_init__(self) -> None:
        if self.side not in ("right", "left"):
            raise ValueError(f"side={self.side!r}; expected right or left")

    def _pad(self, rows: list[list[int]], value: int, width: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.side == "right":
                out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            elif row:
                out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        return out

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        ids = [e["input_ids"] for e in examples]
        width = max(len(r) for r in ids)
        batch = {"input_ids": self._pad(ids, self.pad_id, width),
                 "attention_mask": self._pad([[1] * len(r) for r in ids], 0, width)}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = self._pad([e["token_type_ids"] for e in examples], 0, width)
        if "labels" in examples[0]:
            labels = [e["labels"] for e in examples]
            if isinstance(labels[0], int):
                batch["labels"] = torch.tensor(labels, dtype=torch.long)  # (B,)
            else:
                batch["labels"] = self._pad(labels, IGNORE_INDEX, width)  # (B, T)
        return batch
