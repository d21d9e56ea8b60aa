"""Every ```python block of README.md and docs/*.md runs, each in a fresh namespace.

A block is skipped only when the line just before its fence (blank lines aside) is
`<!-- skip-test -->`: kept for the few blocks that need a GPU or a large bundled model.
docs/CONTRACTS.md is the internal API summary between packages (signatures with `...`),
not user documentation, so it is not collected.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_MARK = "<!-- skip-test -->"
NOT_USER_DOCS = {"CONTRACTS.md"}
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    return [f for f in files if f.is_file() and f.name not in NOT_USER_DOCS]


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(first line number, code, skipped) of every ```python block in a markdown text."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not re.match(rf"^{indent}```\s*$", lines[j]):
            j += 1
        if lang in ("python", "py"):
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            skipped = k >= 0 and lines[k].strip() == SKIP_MARK
            code = "\n".join(line[len(indent):] for line in lines[i + 1:j])
            blocks.append((i + 2, code, skipped))
        i = j + 1
    return blocks


def _cases() -> list:
    cases = []
    for path in doc_files():
        for line, code, skipped in python_blocks(path.read_text(encoding="utf-8")):
            rel = path.relative_to(ROOT).as_posix()
            marks = [pytest.mark.skip(reason=f"{SKIP_MARK} in {rel}")] if skipped else []
            cases.append(pytest.param(rel, line, code, id=f"{rel}:{line}", marks=marks))
    return cases


@pytest.mark.parametrize("doc, line, code", _cases())
def test_doc_block_runs(doc: str, line: int, code: str, tmp_path, monkeypatch) -> None:
    # cwd = a scratch folder, so blocks that save adapters or write files leave nothing behind
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    # pad with newlines so the traceback's line numbers are the markdown file's
    source = "\n" * (line - 1) + code
    namespace = {"__name__": "__main__"}
    exec(compile(source, str(ROOT / doc), "exec"), namespace)


def test_block_parser_finds_and_skips() -> None:
    text = "\n".join([
        "```python", "a = 1", "```",
        "<!-- skip-test -->", "", "```python", "raise SystemExit", "```",
        "```bash", "ls", "```",
        "  ```python", "  b = 2", "  ```",
    ])
    found = python_blocks(text)
    assert [(line, code, skipped) for line, code, skipped in found] == [
        (2, "a = 1", False), (7, "raise SystemExit", True), (13, "b = 2", False)]


def test_every_doc_page_is_collected() -> None:
    names = {p.name for p in doc_files()}
    assert "README.md" in names
    assert not names & NOT_USER_DOCS
