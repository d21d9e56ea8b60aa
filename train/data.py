"""Data: which file, train / held-out split, label sets, encoding, and the padding collator.

Reading files is ``train.formats``; rendering conversations is ``train.templates``; packing and
length-grouped batches are ``train.packing``. Records are either

- classification ``{"text": str, "label": str}`` (the label becomes an id through
  ``label_set`` / ``encode_labels``), or
- conversations ``{"messages": [{"role", "content"}, ...]}`` (Alpaca, chat and ShareGPT rows).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .formats import DataError, read_records
from .templates import IGNORE_INDEX, encode_conversation, format_prompt

__all__ = ["BUNDLED_DATA", "BUNDLED_LABEL_WORDS", "IGNORE_INDEX", "DataError", "resolve_data", "read_records",
           "split_records", "label_set", "encode_labels", "to_messages", "format_prompt", "encode_instruction",
           "encode_text", "classification_to_instruction", "answer_words", "PadCollator"]

BUNDLED_DATA = {"rotten_tomatoes": Path(__file__).parent / "data" / "rotten_tomatoes.csv"}
BUNDLED_LABEL_WORDS = {"rotten_tomatoes": ("negative", "positive")}  # answer words of labels 0, 1


def resolve_data(name_or_path: str) -> Path:
    """A bundled data name (``rotten_tomatoes``), a file or a ``datasets`` folder -> its path."""
    if name_or_path in BUNDLED_DATA:
        return BUNDLED_DATA[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise DataError(f"--data {name_or_path!r} is neither a bundled name {sorted(BUNDLED_DATA)} "
                        f"nor an existing file or folder")
    return path


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


def _as_int(label: str):
    try:
        return int(label)
    except ValueError:
        return None


def label_set(records: list[dict], num_labels: int = 0) -> tuple[str, ...]:
    """The label names of training records; a name's position is its class id.

    Integer labels keep their value as the id (names ``"0" .. "K-1"``, K = ``num_labels`` or the
    largest label + 1); any other labels are sorted, so the order does not depend on the file's
    row order.

    Raises:
        DataError: an integer label outside ``0..num_labels-1``, or ``num_labels`` disagreeing
        with the number of named labels.
    """
    raw = [str(r["label"]) for r in records]
    ints = [_as_int(x) for x in raw]
    if all(i is not None for i in ints):
        k = num_labels or max(ints) + 1
        for r, i in zip(records, ints):
            if not 0 <= i < k:
                raise DataError(f"{r.get('where', 'record')}: label {i} is outside the label set 0..{k - 1}")
        names = tuple(str(i) for i in range(k))
    else:
        names = tuple(sorted(set(raw)))
        if num_labels and num_labels != len(names):
            raise DataError(f"num_labels={num_labels} but the training data has {len(names)} labels {list(names)}")
    if len(names) < 2:
        raise DataError(f"the training data has the single label {list(names)}; expected at least 2 labels")
    return names


def encode_labels(records: list[dict], names: Sequence[str]) -> list[dict]:
    """Records with ``label`` replaced by its id in ``names``; an unknown label names its record."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for r in records:
        key = str(r["label"])
        if key not in index and _as_int(key) is not None:
            key = str(_as_int(key))
        if key not in index:
            where = r.get("where", "record")
            if _as_int(key) is not None and all(n.isdigit() for n in names):
                raise DataError(f"{where}: label {_as_int(key)} is outside the label set 0..{len(names) - 1}")
            raise DataError(f"{where}: label {r['label']!r} is not in the training label set {list(names)}")
        out.append(dict(r, label=index[key]))
    return out


def to_messages(record: dict) -> list[dict]:
    """The conversation of a record: its ``messages``, or an Alpaca record's user/assistant pair."""
    if "messages" in record:
        return record["messages"]
    inp = record.get("input") or ""
    user = f"{record['instruction']}\n{inp}" if inp else record["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def classification_to_instruction(records: list[dict], instruction: str,
                                  label_words: Sequence[str]) -> list[dict]:
    """Turn ``{"text", "label": id}`` records into conversations answering with a label word."""
    return [{"messages": [{"role": "user", "content": f"{instruction}\n{r['text']}" if r["text"] else instruction},
                          {"role": "assistant", "content": label_words[r["label"]]}],
             "label": r["label"]} for r in records]


def answer_words(data_cfg, labels: Sequence[str]) -> tuple:
    """The answer word of each label when labelled data trains a causal LM.

    ``data_cfg.label_words`` when given; else the bundled data's words, or the label names
    themselves (integer labels need explicit words).
    """
    words = data_cfg.label_words
    if not words:
        words = BUNDLED_LABEL_WORDS.get(data_cfg.data) or tuple(labels)
        if all(n.isdigit() for n in labels) and data_cfg.data not in BUNDLED_LABEL_WORDS:
            raise DataError(f"integer labels {list(labels)} need --label-words (one answer word per label) "
                            f"for an instruct task")
    if len(words) != len(labels):
        raise DataError(f"label_words={list(words)}: expected {len(labels)} words, one per label {list(labels)}")
    return tuple(words)


def encode_instruction(tokenizer, record: dict, max_length: int, template: str = "seed") -> dict:
    """Token ids and labels of one conversation (or Alpaca) record, tokenized once.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        record: ``{"messages": [...]}`` or ``{"instruction", "input", "output"}``.
        max_length: cut the ids from the right to this many tokens.
        template: a resolved template name (see ``train.templates``).
    Returns:
        ``{"input_ids", "labels", "prompt_len"}``, labels -100 outside the answers.
    """
    return encode_conversation(tokenizer, to_messages(record), template, max_length)


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
