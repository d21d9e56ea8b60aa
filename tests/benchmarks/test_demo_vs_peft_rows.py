"""bench_demo_vs_peft merges the rows of separate invocations into one docs table."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_demo_vs_peft as bench  # noqa: E402
from _common import markdown_table, replace_section  # noqa: E402


def _row(name, acc):
    return [name, "200", "2", acc, acc, "yes", "1 / 1", "1.0 / 1.0", "0.1 / 0.1", "1.0 / 1.0", "12-02 01:50 UTC, 1 thr"]


def _doc(rows):
    return replace_section("# Benchmarks\n", bench.SECTION, "### t\n\n" + markdown_table(bench.COLUMNS, rows))


def test_new_rows_replace_their_own_and_keep_the_rest_in_row_order():
    doc = _doc([_row("prompt", "0.700"), _row("lora", "0.790"), _row("ia3", "0.800")])
    out = bench.merged([_row("qlora", "0.770"), _row("lora", "0.801")], doc)
    assert [r[0] for r in out] == ["prompt", "lora", "qlora", "ia3"]
    assert [r[3] for r in out] == ["0.700", "0.801", "0.770", "0.800"]


def test_rows_of_another_layout_or_outside_the_section_are_not_kept():
    old = markdown_table(bench.COLUMNS[:-1], [_row("prompt", "0.7")[:-1]])
    doc = replace_section("| lora | stray |\n", bench.SECTION, old)
    assert bench.kept_rows(doc, set()) == []
    assert bench.kept_rows("# no section\n", set()) == []


def test_peft_side_of_a_ptuning_row_uses_the_rows_encoder(tmp_path):
    """peft's P-Tuning is built with the demo row's encoder (LSTM now), not a fixed MLP."""
    from types import SimpleNamespace

    from tests.models import tiny_bert_classifier
    from train.demo import demo_rows
    tiny_bert_classifier(num_labels=2).save_pretrained(tmp_path)
    cfg = demo_rows()["ptuning"]
    assert cfg.model.encoder == "lstm"
    for encoder in ("lstm", "mlp"):
        row = cfg.__class__.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "encoder": encoder}})
        p = SimpleNamespace(cfg=row, folder=tmp_path, task="seq_cls", num_labels=2)
        model = bench.peft_model(p, "ptuning")
        peft_cfg = model.peft_config["default"]
        assert str(getattr(peft_cfg.encoder_reparameterization_type, "value", peft_cfg.encoder_reparameterization_type)) \
            == encoder.upper()
        encoder_module = model.prompt_encoder["default"]
        assert hasattr(encoder_module, "lstm_head") == (encoder == "lstm")
