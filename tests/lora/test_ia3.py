"""IA3 against peft 0.21.2's IA3, built in the same test, over the tiny model families."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from lora import (IA3Config, IA3Layer, LoRAConfig, TrainedCopy, add_ia3, add_lora, load_lora, lora_parameters,
                  merge_lora, remove_lora, save_lora, trainable_summary, unmerge_lora)
from lora.inject import adapter_tensors
from tests.models import tiny_causal_lm

from .conftest import FAMILIES, assert_unchanged, base_model, batch, peft_trainable, randomize_both, snapshot
from .test_equivalence import _peft_summary

TOL = dict(atol=1e-6, rtol=1e-6)


def ia3_config(family: str, **kw) -> IA3Config:
    if family == "bert":  # the classification head trains in full, like peft's SEQ_CLS
        kw.setdefault("modules_to_save", ("classifier",))
    return IA3Config(**kw)


def peft_ia3(family: str, model, **kw):
    from peft import IA3Config as PeftIA3Config, get_peft_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, PeftIA3Config(task_type="SEQ_CLS" if family == "bert" else "CAUSAL_LM", **kw))


def ia3_pair(family: str):
    ours = add_ia3(base_model(family), ia3_config(family))
    return ours, peft_ia3(family, base_model(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_matches_peft(family: str) -> None:
    """Same wrapped layers, vector shapes, ones init and summary; logits and every gradient equal peft's."""
    ours, pm = ia3_pair(family)
    mine, theirs = adapter_tensors(ours), peft_trainable(pm)
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert any(k.endswith("ia3_l") and v.shape[0] == 1 for k, v in mine.items())  # some feed-forward vector
    assert {id(p) for p in lora_parameters(ours)} == {id(p) for p in ours.parameters() if p.requires_grad}
    assert trainable_summary(ours) == _peft_summary(pm)
    for name, module in ours.named_modules():
        if isinstance(module, IA3Layer):
            assert module.is_feedforward == pm.base_model.model.get_submodule(name).is_feedforward, name

    randomize_both(ours, pm)
    inputs = batch(family)
    out, ref = ours(**inputs), pm(**inputs)
    assert_close(out.logits, ref.logits, **TOL)
    out.loss.backward()
    ref.loss.backward()
    for key in mine:
        assert_close(mine[key].grad, theirs[key].grad, **TOL, msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_adamw_steps_match_peft(family: str) -> None:
    """5 AdamW steps in train mode (model dropout on) give peft's losses."""
    ours, pm = ia3_pair(family)
    randomize_both(ours, pm)
    ours.train()
    pm.train()
    inputs = batch(family)
    opt_a = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        losses = []
        for model, opt in ((ours, opt_a), (pm, opt_b)):
            torch.manual_seed(100 + step)
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        assert_close(losses[0], losses[1], **TOL, msg=f"step {step}")


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_merge_unmerge_remove(family: str) -> None:
    """merged == unmerged == peft's merge_and_unload; unmerge gives the weights back; remove gives
    back the same objects and bitwise outputs."""
    model = base_model(family)
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    originals = dict(model.named_modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base_logits = model(**inputs).logits
        add_ia3(model, ia3_config(family))
        pm = peft_ia3(family, base_model(family))
        randomize_both(model, pm)
        unmerged = model(**inputs).logits
        assert not torch.equal(unmerged, base_logits)
        merge_lora(model)
        merge_lora(model)  # idempotent
        merged = model(**inputs).logits
        assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        reference = pm.merge_and_unload()(**inputs).logits
        assert_close(merged, reference, **TOL)
        unmerge_lora(model)
        unmerge_lora(model)
        for name, module in model.named_modules():
            if isinstance(module, IA3Layer):
                key = name + ".weight"
                assert_close(module.base_layer.weight, before[key], atol=1e-6, rtol=1e-6, msg=key)
        remove_lora(model)
        assert all(m is originals[n] for n, m in model.named_modules())
        assert set(dict(model.named_modules())) == set(originals)
        current = model(**inputs).logits
        assert_close(current, base_logits, atol=1e-6, rtol=1e-6)  # (weights rounded by * then / l)

        add_ia3(model, ia3_config(family))
        assert torch.equal(model(**inputs).logits, current)  # ones: bitwise the base
        randomize_both(model, peft_ia3(family, base_model(family)))
        expect = model(**inputs).logits
        remove_lora(model, merge=True)
        assert not any(isinstance(m, (IA3Layer, TrainedCopy)) for m in model.modules())
        assert_close(model(**inputs).logits, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_folders_both_ways(family: str, tmp_path) -> None:
    """ours -> peft and peft -> ours give the same logits; save -> load is bitwise."""
    from peft import PeftModel
    ours, pm = ia3_pair(family)
    randomize_both(ours, pm)
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    with torch.no_grad():
        expect = ours(**inputs).logits
    save_lora(ours, tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "IA3" and raw["feedforward_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(base_model(family), tmp_path / "ours").eval()
    pm.save_pretrained(tmp_path / "peft")
    back = load_lora(base_model(family), tmp_path / "peft")
    again = load_lora(base_model(family), tmp_path / "ours")
    with torch.no_grad():
        assert_close(theirs(**inputs).logits, expect, **TOL)
        assert_close(back(**inputs).logits, expect, **TOL)
    saved = adapter_tensors(ours)
    for key, value in adapter_tensors(again).items():
        assert torch.equal(value, saved[key]), key
    assert sorted(adapter_tensors(back)) == sorted(saved)


def test_ia3_config_and_bad_inputs(tmp_path) -> None:
    """Clear errors, and a failed call leaves the model unchanged."""
    with pytest.raises(ValueError, match=r"feedforward_modules=\['fc'\] must be a subset"):
        IA3Config(target_modules=["q"], feedforward_modules=["fc"])
    with pytest.raises(ValueError, match="IA3Config.target_modules=.*regular expression"):
        IA3Config(target_modules="(")
    model = base_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="matched no module.*modules IA3 can wrap"):
        add_ia3(model, IA3Config(target_modules=["nope"]))
    with pytest.raises(ValueError, match="IA3 cannot wrap.*embed_tokens"):
        add_ia3(model, IA3Config(target_modules=["embed_tokens"]))
    assert_unchanged(model, snap)
    model.config.model_type = "unknown-arch"  # an architecture the registry does not know
    with pytest.raises(ValueError, match="no default IA3 targets for model_type='unknown-arch'"):
        add_ia3(model, IA3Config())
    with pytest.raises(ValueError, match="no default IA3 feed-forward modules for model_type='unknown-arch'"):
        add_ia3(model, IA3Config(target_modules=["k_proj"]))
    assert_unchanged(model, snap)
    add_ia3(model, IA3Config(target_modules=["k_proj"], feedforward_modules=[]))  # explicit: no feed-forward
    assert all(not m.is_feedforward for m in model.modules() if isinstance(m, IA3Layer))
    with pytest.raises(ValueError, match="already has"):
        add_lora(model, LoRAConfig())

    # folders: another method, wrong shapes, a LoRA folder into an IA3 model
    ours = add_ia3(base_model("llama"), IA3Config())
    save_lora(ours, tmp_path / "ia3")
    lora_model = add_lora(base_model("llama"), LoRAConfig(r=2))
    save_lora(lora_model, tmp_path / "lora")
    with pytest.raises(ValueError, match="holds a LoRAConfig adapter but the model has a IA3Config one"):
        load_lora(ours, tmp_path / "lora")
    tensors = load_file(str(tmp_path / "ia3" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("k_proj.ia3_l"))
    tensors[key] = torch.ones(3, 1)
    save_file(tensors, str(tmp_path / "ia3" / "adapter_model.safetensors"))
    fresh = base_model("llama")
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match=r"shape mismatches .*k_proj.ia3_l: file \(3, 1\) vs model \(8, 1\)"):
        load_lora(fresh, tmp_path / "ia3")
    assert_unchanged(fresh, snap)
    raw = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    raw["exclude_modules"] = ["k_proj"]
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="exclude_modules=.*not supported"):
        load_lora(fresh, tmp_path / "ia3")
    assert_unchanged(fresh, snap)


def test_ia3_zero_vector_cannot_unmerge() -> None:
    model = add_ia3(tiny_causal_lm("llama"), IA3Config())
    layer = [m for m in model.modules() if isinstance(m, IA3Layer)][-1]  # the last one: others come first
    with torch.no_grad():
        layer.ia3_l[0] = 0.0
    merge_lora(model)
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="ia3_l has zero entries"):
        unmerge_lora(model)
    with pytest.raises(ValueError, match="ia3_l has zero entries"):
        remove_lora(model)
    assert all(torch.equal(p, merged[n]) for n, p in model.named_parameters())  # no layer was touched
    assert all(m.merged for m in model.modules() if isinstance(m, IA3Layer))


def test_ia3_on_an_nf4_base() -> None:
    """IA3 trains on a 4-bit base (starts bitwise equal to it), refuses to merge, and removes cleanly."""
    from lora import NF4Linear, quantize_model
    model = quantize_model(tiny_causal_lm("llama"), skip=("lm_head",))
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
    originals = dict(model.named_modules())
    add_ia3(model, IA3Config())
    layers = [m for m in model.modules() if isinstance(m, IA3Layer)]
    assert layers and all(isinstance(m.base_layer, NF4Linear) for m in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.ia3_l.grad is not None for m in layers)
    with pytest.raises(RuntimeError, match="cannot merge IA3Layer into a quantized NF4Linear"):
        merge_lora(model)
    remove_lora(model)
    assert all(m is originals[n] for n, m in model.named_modules())
