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
