"""Every reader: chat / ShareGPT / Alpaca / classification files and datasets folders, one error per bad record."""
from __future__ import annotations

import json

import pytest

from train.formats import DataError, read_records

USER, BOT = {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "great movie"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_and_sharegpt_become_the_same_messages(tmp_path):
    system = {"role": "system", "content": "be nice"}
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [system, USER, BOT]}, {"messages": [USER, BOT, USER, BOT]}])
    share = _jsonl(tmp_path / "share.jsonl", [
        {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hello world"},
                           {"from": "gpt", "value": "great movie"}]},
        {"conversations": [{"from": "human", "value": "hello world"}, {"from": "gpt", "value": "great movie"}] * 2}])
    expected = [[system, USER, BOT], [USER, BOT, USER, BOT]]
    assert [r["messages"] for r in read_records(chat)] == expected
    assert [r["messages"] for r in read_records(share)] == expected


def test_classification_csv_and_jsonl_with_own_columns(tmp_path):
    (tmp_path / "c.csv").write_text("review,sentiment,split\n\"good, really\",pos,train\nbad,neg,test\n")
    recs = read_records(tmp_path / "c.csv", text_column="review", label_column="sentiment")
    assert [(r["text"], r["label"], r["split"]) for r in recs] == [("good, really", "pos", "train"), ("bad", "neg", "test")]
    jl = _jsonl(tmp_path / "c.jsonl", [{"review": "good", "sentiment": "pos"}, {"review": "bad", "sentiment": 0}])
    assert [(r["text"], r["label"]) for r in read_records(jl, "review", "sentiment")] == [("good", "pos"), ("bad", "0")]


@pytest.mark.parametrize("rows,match", [
    ([{"messages": [USER, {"role": "robot", "content": "x"}]}], r"x.jsonl:1: field 'messages\[1\].role' is 'robot'"),
    ([{"messages": [USER, {"role": "assistant", "content": 3}]}], r"x.jsonl:1: field 'messages\[1\].content' is a int"),
    ([{"messages": [USER]}], "x.jsonl:1: field 'messages' has no assistant turn"),
    ([{"messages": []}], "x.jsonl:1: field 'messages' must be a non-empty list"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}],
     r"x.jsonl:1: field 'conversations\[1\].value' is missing"),
    ([{"messages": [USER, BOT]}, {"text": "a", "label": "b"}], "x.jsonl:2: a classification record in a file of conversation"),
    ([{"messages": [USER, BOT]}, "just text"], "x.jsonl:2: a str, expected an object"),
    ([{"text": "a", "label": True}], "x.jsonl:1: field 'label' is True"),
    ([{"question": "a"}], r"x.jsonl:1: no known fields in \['question'\]"),
])
def test_bad_records_name_file_line_and_field(tmp_path, rows, match):
    _jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError, match=match):
        read_records(tmp_path / "x.jsonl")


def test_json_list_names_the_record(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 1}]))
    with pytest.raises(DataError, match=r"a.json: record 1: field 'output' is a int"):
        read_records(tmp_path / "a.json")


datasets = pytest.importorskip("datasets")


def test_datasets_folders(tmp_path):
    ds = datasets.Dataset.from_list([{"messages": [USER, BOT]}, {"messages": [USER, BOT, USER, BOT]}])
    ds.save_to_disk(str(tmp_path / "chat"))
    assert [r["messages"] for r in read_records(tmp_path / "chat")] == [[USER, BOT], [USER, BOT, USER, BOT]]
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["fine"], "label": [1]}, features=features)})
    dd.save_to_disk(str(tmp_path / "cls"))
    recs = read_records(tmp_path / "cls")
    assert [(r["text"], r["label"], r["split"]) for r in recs] == [("good", "pos", "train"), ("bad", "neg", "train"),
                                                                   ("fine", "pos", "test")]
    bad = datasets.Dataset.from_list([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad \[dataset\] row 1: field 'output' is a NoneType"):
        read_records(tmp_path / "bad")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one saved by datasets"):
        read_records(tmp_path / "plain")
