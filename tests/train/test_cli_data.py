"""The command line with the data options: string labels, --eval-data, eval on another file, templates,
packing, grouping, datasets folders, and the predict / generate errors."""
from __future__ import annotations

import json

import pytest

from tests.models import tiny_bert_classifier, tiny_causal_lm, tiny_tokenizer
from tests.train.test_templates import CHAT
from train.cli import main

TEXTS = ["the movie was great", "a dull , boring film", "wonderful acting", "far too long", "hello world"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    tiny_causal_lm("llama").save_pretrained(root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    tiny_causal_lm("llama").save_pretrained(root / "llama-chat")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    tok.save_pretrained(root / "llama-chat")
    tiny_bert_classifier(num_labels=3).save_pretrained(root / "bert")
    tiny_tokenizer().save_pretrained(root / "bert")
    moods = ["happy", "sad", "angry"]
    rows = [{"review": f"{t} {i}", "mood": moods[i % 3]} for i, t in enumerate(TEXTS * 4)]
    (root / "moods.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "moods_test.csv").write_text("review,mood\n" + "".join(f'"{t}",{moods[i % 3]}\n' for i, t in enumerate(TEXTS)))
    (root / "three.csv").write_text("text,label\n" + "".join(f'"{t} {i}",{i % 3}\n' for i, t in enumerate(TEXTS * 4)))
    chats = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "great movie"},
                           {"role": "user", "content": "and?"}, {"role": "assistant", "content": t}]}
             for t in TEXTS * 3]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


def _train(out, *flags):
    return main(["train", "--steps", "2", "--batch-size", "2", "--log-every", "1", "--no-progress",
                 "--out", str(out), *flags])


def test_string_labels_eval_data_and_label_names(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--model", str(root / "bert"), "--method", "head", "--data", str(root / "moods.jsonl"),
                  "--text-column", "review", "--label-column", "mood",
                  "--eval-data", str(root / "moods_test.csv")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == ["angry", "happy", "sad"] and summary["n_eval"] == 5 and summary["n_train"] == 20
    assert json.loads((out / "adapter" / "labels.json").read_text()) == {"labels": ["angry", "happy", "sad"]}
    capsys.readouterr()
    assert main(["predict", str(out), "what a great movie", "so dull"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[1] for ln in lines] == ["what a great movie", "so dull"]
    assert all(ln.split("\t")[0] in ("angry", "happy", "sad") for ln in lines)
    (tmp_path / "other.csv").write_text("review,mood\ngreat,happy\nbad,sad\nugh,angry\n")
    assert main(["eval", str(out), "--data", str(tmp_path / "other.csv")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    (tmp_path / "unknown.csv").write_text("review,mood\ngreat,joyful\n")
    assert main(["eval", str(out), "--data", str(tmp_path / "unknown.csv")]) == 2
    assert "unknown.csv:2: label 'joyful' is not in the training label set" in capsys.readouterr().err
    assert main(["generate", str(out), "hello"]) == 2
    err = capsys.readouterr().err
    assert "classifier run" in err and "use `predict`" in err


def test_classify_with_num_labels_3_needs_no_label_words(root, tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--model", str(root / "bert"), "--method", "lora", "--task", "classify",
                  "--num-labels", "3", "--data", str(root / "three.csv")) == 0
    assert json.loads((out / "summary.json").read_text())["labels"] == ["0", "1", "2"]


@pytest.mark.parametrize("flag", ["--packing", "--group-by-length"])
def test_chat_template_run_with_packing_or_grouping(root, tmp_path, capsys, flag):
    out = tmp_path / "run"
    assert _train(out, "--model", str(root / "llama-chat"), "--method", "lora", "--data", str(root / "chat.jsonl"),
                  "--max-length", "48", flag) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["template"] == "chat"  # auto: the tokenizer carries one
    assert (summary["packed_rows"] is not None) == (flag == "--packing")
    if flag == "--packing":
        assert summary["packed_rows"] < summary["n_train"] or summary["packed_rows"] < 15
    capsys.readouterr()
    assert main(["generate", str(out), "hello world", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("<|user|>\nhello world\n<|assistant|>\n")
    assert main(["predict", str(out), "hello world"]) == 2
    assert "generative run" in capsys.readouterr().err


def test_packing_refuses_soft_prompts(root, tmp_path, capsys):
    assert _train(tmp_path / "run", "--model", str(root / "llama"), "--method", "prompt", "--n-virtual", "2",
                  "--data", str(root / "chat.jsonl"), "--packing") == 2
    assert "--packing needs an instruct task with lora or qlora" in capsys.readouterr().err


datasets = pytest.importorskip("datasets")


def test_datasets_folder_on_the_seed_template(root, tmp_path, capsys):
    rows = [{"instruction": "Say hello", "input": t, "output": "hello world"} for t in TEXTS * 2]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "run"
    assert _train(out, "--model", str(root / "llama"), "--method", "lora", "--data", str(tmp_path / "ds"),
                  "--template", "auto", "--max-length", "40") == 0
    assert json.loads((out / "summary.json").read_text())["template"] == "seed"
