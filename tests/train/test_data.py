"""The chat template, -100 prompt labels, readers, their errors, and the padding collator."""
from __future__ import annotations

import json

import pytest
import torch

from tests.models import tiny_tokenizer
from train.data import (BUNDLED_DATA, IGNORE_INDEX, DataError, PadCollator, classification_to_instruction,
                        encode_instruction, encode_text, format_prompt, read_records, resolve_data,
                        split_records)


def test_template_matches_the_seed_strings():
    # the seeds' literal strings, written out by hand
    assert format_prompt("Is it good?", "a fine film") == "Human: Is it good?\na fine film\n\nAssistant: "
    assert format_prompt("Say hi", "") == "Human: Say hi\n\nAssistant: "
    assert format_prompt("  Say hi", "") == "Human:   Say hi\n\nAssistant: "


def test_prompt_labels_are_masked_and_answer_ends_with_eos():
    tok = tiny_tokenizer()
    rec = {"instruction": "Is the sentiment positive or negative?", "input": "great movie", "output": "positive"}
    enc = encode_instruction(tok, rec, max_length=256)
    prompt = tok("Human: Is the sentiment positive or negative?\ngreat movie\n\nAssistant: ")["input_ids"]
    answer = tok("positive", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == prompt + answer + [tok.eos_token_id]
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [tok.eos_token_id]
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
    assert {r["label"] for r in recs} == {0, 1} and sum(r["label"] for r in recs) == 2000
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert (BUNDLED_DATA["rotten_tomatoes"].parent / "SOURCE.md").is_file()


def test_instruction_files_and_conversion(tmp_path):
    items = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"}]
    (tmp_path / "x.json").write_text(json.dumps(items))
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    expected = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "input": "", "output": "e"}]
    assert read_records(tmp_path / "x.json") == expected
    assert read_records(tmp_path / "x.jsonl") == expected
    conv = classification_to_instruction([{"text": "t", "label": 1}], "Q?", ("negative", "positive"))
    assert conv == [{"instruction": "Q?", "input": "t", "output": "positive", "label": 1}]
    recs = [{"text": str(i), "label": i % 2} for i in range(10)]
    train, held = split_records(recs, 0.2, seed=0)
    assert len(held) == 2 and len(train) == 8 and split_records(recs, 0.2, seed=0) == (train, held)


@pytest.mark.parametrize("name,content,match", [
    ("empty.csv", "text,label\n", "no records"),
    ("cols.csv", "sentence,label\nhi,1\n", r"missing column\(s\) \['text'\]"),
    ("lab.csv", "text,label\nhi,2\n", "outside the label set"),
    ("nonint.csv", "text,label\nhi,pos\n", "not an integer"),
    ("empty.json", "", "no records"),
    ("field.jsonl", '{"instruction": "a"}\n', r"lacks string field\(s\) \['output'\]"),
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
