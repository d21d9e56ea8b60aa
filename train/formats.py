"""Readers: data files and ``datasets`` folders -> records, one clear error per bad record.

Every source yields rows ``(where, dict)``, ``where`` naming the file and line / record / row,
and every row is parsed by one function, so all formats share the same checks:

- classification: a text column and a label column (``--text-column`` / ``--label-column``,
  default ``text`` / ``label``) -> ``{"text": str, "label": str}``; labels stay strings here
  (``train.data.label_set`` turns them into ids);
- Alpaca: ``instruction``, ``output``, optional ``input``;
- chat: ``messages`` = ``[{"role", "content"}, ...]``;
- ShareGPT: ``conversations`` = ``[{"from", "value"}, ...]`` (``human`` / ``gpt`` / ``system``).

Alpaca, chat and ShareGPT rows all become ``{"messages": [...]}``. A ``split`` field/column
(``train`` / anything else) is kept. CSV, JSON (a list), JSONL and folders written by
``datasets.Dataset.save_to_disk`` (a ``DatasetDict``'s split names become ``split``) are read;
the last needs the optional ``datasets`` package (``pip install purepeft[data]``).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

__all__ = ["DataError", "read_rows", "parse_row", "read_records", "ROLES"]

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}


class DataError(ValueError):
    """A data file that cannot be used as asked; the message names the file, line/row and field."""


def _csv_rows(path: Path, expected: tuple[str, str]) -> Iterator[tuple[str, dict]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if not cols:
            return
        known = {"messages", "conversations", "instruction"} & set(cols)
        missing = [c for c in expected if c not in cols]
        if missing and not known:  # a classification CSV: name its missing columns once
            raise DataError(f"{path}: missing column(s) {missing}; found {cols}, expected {','.join(expected)}")
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    yield f"{path}:{line}", json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line}: not valid JSON ({e.msg})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8")
    try:
        items = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
    for i, item in enumerate(items):
        yield f"{path}: record {i}", item


def _datasets_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a folder saved by `datasets`; reading it needs the optional "
                        f"package: pip install 'purepeft[data]' (or pip install datasets)") from None
    loaded = datasets.load_from_disk(str(path))
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, ds in parts:
        names = {c: f.names for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
        for i, row in enumerate(ds):
            row = {k: (names[k][v] if k in names and isinstance(v, int) and v >= 0 else v) for k, v in row.items()}
            if split is not None:
                row.setdefault("split", split)
            yield f"{path} [{split or 'dataset'}] row {i}", row


def read_rows(path: Path, columns: tuple[str, str] = ("text", "label")) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` pairs of a .csv / .json / .jsonl file or a ``datasets`` folder.

    ``columns`` (text, label) are required of a CSV that holds no conversation columns."""
    path = Path(path)
    if path.is_dir():
        if not any((path / n).is_file() for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise DataError(f"{path}: a folder but not one saved by datasets.save_to_disk "
                            f"(no dataset_info.json / dataset_dict.json)")
        return _datasets_rows(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".csv":
        return _csv_rows(path, columns)
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows}
    if path.suffix not in readers:
        raise DataError(f"{path}: unknown suffix {path.suffix!r}; expected .csv, .json, .jsonl "
                        f"or a folder saved by datasets")
    return readers[path.suffix](path)


def _string(where: str, row: dict, key: str, optional: bool = False, prefix: str = "") -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in row else f"a {type(value).__name__}"
        raise DataError(f"{where}: field {prefix + key!r} is {got}; expected a string")
    return value


def _turns(where: str, row: dict, key: str, role_key: str, text_key: str, roles: dict) -> list[dict]:
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns")
    messages = []
    for j, turn in enumerate(turns):
        field = f"{key}[{j}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field {field} is a {type(turn).__name__}; expected an object")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(f"{where}: field {f'{field}.{role_key}'!r} is {role!r}; expected one of {sorted(roles)}")
        messages.append({"role": roles[role], "content": _string(where, turn, text_key, prefix=f"{field}.")})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field {key!r} has no assistant turn; nothing to learn")
    return messages


def parse_row(where: str, row, text_column: str = "text", label_column: str = "label") -> dict:
    """One row -> a record; the format is told by its keys (see the module docstring).

    Raises:
        DataError: naming ``where`` and the bad field.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: a {type(row).__name__}, expected an object")
    if "messages" in row:
        rec = {"messages": _turns(where, row, "messages", "role", "content", {r: r for r in ROLES})}
    elif "conversations" in row:
        rec = {"messages": _turns(where, row, "conversations", "from", "value", _SHAREGPT_ROLES)}
    elif "instruction" in row:
        instruction, inp = _string(where, row, "instruction"), _string(where, row, "input", optional=True)
        output = _string(where, row, "output")
        rec = {"messages": [{"role": "user", "content": f"{instruction}\n{inp}" if inp else instruction},
                            {"role": "assistant", "content": output}]}
    elif text_column in row or label_column in row:
        label = row.get(label_column)
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
            got = "missing" if label_column not in row else repr(label)
            raise DataError(f"{where}: field {label_column!r} is {got}; expected a label (a name or an integer)")
        if text_column not in row:
            raise DataError(f"{where}: field {text_column!r} is missing; expected the text to classify")
        text = row[text_column]
        rec = {"text": "" if text is None else _string(where, row, text_column), "label": str(label).strip()}
    else:
        raise DataError(f"{where}: no known fields in {sorted(row)}; expected {text_column!r}+{label_column!r} "
                        f"(classification), instruction+output (Alpaca), messages (chat) or conversations (ShareGPT)")
    if row.get("split"):
        rec["split"] = str(row["split"])
    return rec


def read_records(path: Path, text_column: str = "text", label_column: str = "label") -> list[dict]:
    """Every record of a file or ``datasets`` folder, in order; one kind per source.

    Raises:
        DataError: unknown suffix, empty source, a bad record (naming its line/row and field),
        or records of mixed kinds.
    """
    records, kind = [], None
    try:
        for where, row in read_rows(path, (text_column, label_column)):
            rec = parse_row(where, row, text_column, label_column)
            rec_kind = "classification" if "text" in rec else "conversation"
            if kind is None:
                kind = rec_kind
            elif rec_kind != kind:
                raise DataError(f"{where}: a {rec_kind} record in a file of {kind} records")
            rec["where"] = where
            records.append(rec)
    except UnicodeDecodeError:  # e.g. a Latin-1 file: say where, rather than guess an encoding
        raw = Path(path).read_bytes()
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
