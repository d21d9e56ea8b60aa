"""Adapter folders: round trip, both directions with peft, and loud, harmless failures."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from lora import LoRAConfig, add_lora, load_lora, lora_state_dict, save_lora
from lora import io as lora_io

from .conftest import FAMILIES, assert_unchanged, snapshot, base_model, batch, build_pair, our_config, randomize_both

TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", [dict(r=4, alpha=8), dict(r=2, alpha=16, use_dora=True, use_rslora=True)])
@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_and_peft_both_ways(family: str, variant: dict, tmp_path) -> None:
    from peft import PeftModel
    ours, pm = build_pair(family, our_config(family, **variant))
    randomize_both(ours, pm)
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    with torch.no_grad():
        logits = ours(**inputs).logits

    # ours -> ours: bitwise
    save_lora(ours, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    loaded = load_lora(base_model(family), tmp_path / "ours")
    saved = lora_state_dict(ours)
    again = lora_state_dict(loaded)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, logits)

    # ours -> peft: peft reads our folder and computes the same logits
    ref = PeftModel.from_pretrained(base_model(family), tmp_path / "ours")
    with torch.no_grad():
        assert_close(ref(**inputs).logits, logits, **TOL)

    # peft -> ours: a folder written by peft loads and computes peft's logits
    pm.save_pretrained(tmp_path / "peft")
    mine = load_lora(base_model(family), tmp_path / "peft")
    with torch.no_grad():
        assert_close(mine(**inputs).logits, pm(**inputs).logits, **TOL)


@pytest.fixture
def saved_llama(tmp_path):
    model = add_lora(base_model("llama"), LoRAConfig(r=4, alpha=8))
    return save_lora(model, tmp_path / "adapter")


def test_bad_folders_raise_and_leave_model_unchanged(saved_llama, tmp_path, monkeypatch) -> None:
    # no pickle anywhere on the load path
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    weights = saved_llama / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    model = base_model("llama")
    snap = snapshot(model)

    # shapes that do not fit (an r=2 adapter file under an r=4 config)
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    bad = dict(tensors, **{key: torch.zeros(2, 16)})
    save_file(bad, str(weights))
    with pytest.raises(ValueError, match=r"shape mismatches \[.*q_proj.lora_A.weight: file \(2, 16\) vs model \(4, 16\)"):
        load_lora(model, saved_llama)
    assert_unchanged(model, snap)

    # missing and unexpected keys are named
    bad = {k: v for k, v in tensors.items() if k != key}
    bad["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] = torch.zeros(4, 16)
    save_file(bad, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \[.*q_proj.lora_A.weight.*unexpected keys \[.*o_proj"):
        load_lora(model, saved_llama)
    assert_unchanged(model, snap)

    # a truncated safetensors file
    save_file(tensors, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_lora(model, saved_llama)
    assert_unchanged(model, snap)
    save_file(tensors, str(weights))

    # a folder of another method
    from peft import PromptTuningConfig, get_peft_model
    other = get_peft_model(base_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    other.save_pretrained(tmp_path / "prompt")
    with pytest.raises(ValueError, match="peft_type='PROMPT_TUNING'.*not a LoRA adapter"):
        load_lora(model, tmp_path / "prompt")
    assert_unchanged(model, snap)

    # an option we do not implement, and a missing folder
    raw = json.loads((saved_llama / "adapter_config.json").read_text())
    raw["rank_pattern"] = {"q_proj": 2}  # now implemented: the file's [4, ...] tensors do not fit r=2
    (saved_llama / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"shape mismatches .*q_proj.lora_A.weight: file \(4, 16\) vs model \(2, 16\)"):
        load_lora(model, saved_llama)
    assert_unchanged(model, snap)
    raw["rank_pattern"], raw["lora_bias"] = {}, True
    (saved_llama / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="lora_bias=True is not supported"):
        load_lora(model, saved_llama)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(model, tmp_path / "nowhere")
    assert_unchanged(model, snap)


def test_writes_are_atomic(saved_llama, monkeypatch) -> None:
    """A failing write leaves the previous files intact and no temp file behind."""
    before = {p.name: p.read_bytes() for p in saved_llama.iterdir()}
    model = add_lora(base_model("llama"), LoRAConfig(r=4, alpha=8))

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora_io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_lora(model, saved_llama)
    assert {p.name: p.read_bytes() for p in saved_llama.iterdir()} == before


def test_load_into_model_with_lora_loads_weights_only(saved_llama) -> None:
    src = load_lora(base_model("llama"), saved_llama)
    dst = add_lora(base_model("llama"), LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for p in lora_state_dict(dst).values():
            p.add_(1.0)
    load_lora(dst, saved_llama)
    a, b = lora_state_dict(src), lora_state_dict(dst)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="alpha: model 16 vs folder 8"):
        load_lora(add_lora(base_model("llama"), LoRAConfig(r=4, alpha=16)), saved_llama)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_folders_both_ways(bias: str, tmp_path) -> None:
    """Trained biases are saved under peft's keys and load in both directions."""
    ours, pm = build_pair("bert", our_config("bert", bias=bias))
    randomize_both(ours, pm)
    with torch.no_grad():
        for (n, p), (_, q) in zip(ours.named_parameters(), pm.base_model.model.named_parameters()):
            if n.endswith("bias") and p.requires_grad:  # make trained biases differ from the base
                p.add_(0.5)
                q.add_(0.5)
    inputs = {k: v for k, v in batch("bert").items() if k != "labels"}
    save_lora(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    from peft import PeftModel
    ref = PeftModel.from_pretrained(base_model("bert"), tmp_path / "ours")
    mine = load_lora(base_model("bert"), tmp_path / "peft")
    with torch.no_grad():
        assert_close(ref(**inputs).logits, ours(**inputs).logits, **TOL)
        assert_close(mine(**inputs).logits, pm(**inputs).logits, **TOL)
        assert_close(mine(**inputs).logits, ours(**inputs).logits, **TOL)
