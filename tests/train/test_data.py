"""The chat template, -100 prompt labels, readers, their errors, and the padding collator."""
from __future__ import annotations

import json

import pytest
import torch

from tests.models import tiny_tokenizer
from train.data import (BUNDLED_DATA, IGNORE_INDEX, DataError, PadCollator, classification_to_instruction,
                        encode_instruction, encode_labels, encode_text, format_prompt, label_set, read_records,
                        resolve_data, split_records)


def test_template_matches_the_seed_strings():
    # the seeds' literal strings, written out by hand
    assert format_prompt("Is it good?", "a fine film") == "Human: Is it good?\na fine film\n\nAssistant: "
    assert format_prompt("Say hi", "") == "Human: Say hi\n\nAssistant: "
    assert format_prompt("  Say hi", "") == "Human:   Say hi\n\nAssistant: "


def test_prompt_labels_are_masked_and_answer_ends_with_eos():
    tok = tiny_tokenizer()
    rec = {"instruction": "Is the sentiment positive or negative?", "input": "great movie", "output": "positive"}
    enc = encode_instruction(tok, rec, max_length=256)
    text = "Human: Is the sentiment positive or negative?\ngreat movie\n\nAssistant: positive</s>"
    assert enc["input_ids"] == tok(text)["input_ids"]  # the whole example tokenized once
    n = enc["prompt_len"]
    assert enc["labels"] == [IGNORE_INDEX] * n + enc["input_ids"][n:]
    assert tok.decode(enc["input_ids"][n:]) == " positive</s>" and enc["input_ids"][-1] == tok.eos_token_id
    assert enc["input_ids"][0] == tok.bos_token_id  # the tokenizer's BOS stays on the prompt


def test_truncation_cuts_from_the_right():
    tok = tiny_tokenizer()
    rec = {"instruction": "hello world " * 20, "input": "", "output": "positive"}
    enc = encode_instruction(tok, rec, max_length=10)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 10
    assert all(x == IGNORE_INDEX for x in enc["labels"])  # answer fell off: nothing to learn
    enc = encode_text(tok, {"text": "hello world " * 20, "label": 1}, max_length=7)
    assert len(enc["input_ids"]) == 7 and enc["labels"] == 1


def test_collator_right_and_left_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = PadCollator(pad_id=0)(rows)
    torch.testing.assert_close(b["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    torch.testing.assert_close(b["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    torch.testing.assert_close(b["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    b = PadCollator(pad_id=3, side="left")(rows)
    torch.testing.assert_close(b["input_ids"], torch.tensor([[5, 6, 7], [3, 3, 8]]))
    torch.testing.assert_close(b["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]]))
    torch.testing.assert_close(b["labels"], torch.tensor([[-100, 6, 7], [-100, -100, 8]]))
    cls = PadCollator(pad_id=0)([{"input_ids": [1, 2], "token_type_ids": [0, 0], "labels": 1},
                                 {"input_ids": [1], "token_type_ids": [0], "labels": 0}])
    torch.testing.assert_close(cls["labels"], torch.tensor([1, 0]))
    torch.testing.assert_close(cls["token_type_ids"], torch.tensor([[0, 0], [0, 0]]))
    with pytest.raises(ValueError, match="side"):
        PadCollator(pad_id=0, side="middle")


def test_bundled_rotten_tomatoes_split():
    recs = read_records(resolve_data("rotten_tomatoes"))
    train, test = split_records(recs, 0.2, seed=0)
    assert (len(recs), len(train), len(test)) == (4000, 3200, 800)
    names = label_set(train)
    assert names == ("0", "1")
    ids = [r["label"] for r in encode_labels(recs, names)]
    assert set(ids) == {0, 1} and sum(ids) == 2000
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert (BUNDLED_DATA["rotten_tomatoes"].parent / "SOURCE.md").is_file()


def test_instruction_files_and_conversion(tmp_path):
    items = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"}]
    (tmp_path / "x.json").write_text(json.dumps(items))
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    expected = [[{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}],
                [{"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]]
    assert [r["messages"] for r in read_records(tmp_path / "x.json")] == expected
    assert [r["messages"] for r in read_records(tmp_path / "x.jsonl")] == expected
    assert [r["where"] for r in read_records(tmp_path / "x.jsonl")] == [f"{tmp_path / 'x.jsonl'}:{i}" for i in (1, 2)]
    conv = classification_to_instruction([{"text": "t", "label": 1}], "Q?", ("negative", "positive"))
    assert conv == [{"messages": [{"role": "user", "content": "Q?\nt"}, {"role": "assistant", "content": "positive"}],
                     "label": 1}]
    # an Alpaca record and its conversation encode identically, to the seed strings
    tok = tiny_tokenizer()
    alpaca = encode_instruction(tok, {"instruction": "Q?", "input": "t", "output": "positive"}, 64)
    assert encode_instruction(tok, conv[0], 64) == alpaca
    assert tok.decode(alpaca["input_ids"][:alpaca["prompt_len"]], skip_special_tokens=True) == "Human: Q?\nt\n\nAssistant:"
    recs = [{"text": str(i), "label": i % 2} for i in range(10)]
    train, held = split_records(recs, 0.2, seed=0)
    assert len(held) == 2 and len(train) == 8 and split_records(recs, 0.2, seed=0) == (train, held)


def test_label_sets():
    recs = [{"text": "a", "label": "pos", "where": "f:2"}, {"text": "b", "label": "neg", "where": "f:3"},
            {"text": "c", "label": "neutral", "where": "f:4"}]
    assert label_set(recs) == ("neg", "neutral", "pos")  # sorted: independent of row order
    assert label_set(recs[::-1]) == ("neg", "neutral", "pos")
    assert [r["label"] for r in encode_labels(recs, label_set(recs))] == [2, 0, 1]
    with pytest.raises(DataError, match=r"f:9: label 'happy' is not in the training label set"):
        encode_labels([{"text": "x", "label": "happy", "where": "f:9"}], ("neg", "pos"))
    with pytest.raises(DataError, match="num_labels=2 but the training data has 3 labels"):
        label_set(recs, num_labels=2)
    ints = [{"text": "a", "label": "2", "where": "f:2"}, {"text": "b", "label": "0", "where": "f:3"}]
    assert label_set(ints) == ("0", "1", "2") and label_set(ints, num_labels=4) == ("0", "1", "2", "3")
    with pytest.raises(DataError, match="f:2: label 2 is outside the label set 0..1"):
        label_set(ints, num_labels=2)
    with pytest.raises(DataError, match="single label"):
        label_set(recs[:1])


@pytest.mark.parametrize("name,content,match", [
    ("empty.csv", "text,label\n", "no records"),
    ("cols.csv", "sentence,label\nhi,1\n", r"cols.csv: missing column\(s\) \['text'\]; found \['sentence', 'label'\]"),
    ("nolab.csv", "text,label\nhi,1\nho,\n", r"nolab.csv:3: field 'label' is ''"),
    ("empty.json", "", "no records"),
    ("field.jsonl", '{"instruction": "a"}\n', r"field.jsonl:1: field 'output' is missing"),
    ("bad.jsonl", '{"instruction": \n', "not valid JSON"),
    ("obj.json", '{"instruction": "a"}', "expected a JSON list"),
    ("x.txt", "hello", "unknown suffix"),
])
def test_bad_files_raise_clear_errors(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        read_records(tmp_path / name)


def test_missing_file_and_unknown_name():
    with pytest.raises(DataError, match="neither a bundled name"):
        resolve_data("/nonexistent/file.csv")
    with pytest.raises(DataError, match="no such file"):
        read_records("/nonexistent/file.csv")
