"""LoRA on nn.Embedding, rank_pattern / alpha_pattern and layers_to_transform against peft 0.21.2."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.testing import assert_close

from lora import LoRAConfig, LoRAEmbedding, LoRALinear, add_lora, load_lora, lora_parameters, merge_lora
from lora import remove_lora, save_lora, trainable_summary, unmerge_lora
from lora.inject import adapter_tensors
from lora.targets import in_layers, layer_index

from .test_equivalence import _peft_summary
from .conftest import (FAMILIES, assert_unchanged, base_model, batch, build_pair, our_config, peft_trainable,
                       randomize_both, snapshot)

TOL = dict(atol=1e-6, rtol=1e-6)
# family -> (input embedding name, an attention projection, the name of its layer list)
NAMES = {
    "gpt2": ("wte", "c_attn", "h"), "bloom": ("word_embeddings", "query_key_value", "h"),
    "llama": ("embed_tokens", "q_proj", "layers"), "qwen2": ("embed_tokens", "q_proj", "layers"),
    "mistral": ("embed_tokens", "q_proj", "layers"), "opt": ("embed_tokens", "q_proj", "layers"),
    "bert": ("word_embeddings", "query", "layer"),
}
# variant -> LoRAConfig kwargs built from a family's NAMES
VARIANTS = {
    "embedding": lambda e, q, layers: dict(r=4, alpha=8, target_modules=(e, q)),
    "embedding-rslora": lambda e, q, layers: dict(r=4, alpha=8, target_modules=(e, q), use_rslora=True),
    "patterns": lambda e, q, layers: dict(r=4, alpha=8, target_modules=(e, q),
                                          rank_pattern={q: 2, e: 3}, alpha_pattern={e: 5.0, rf"{layers}\.1\..*": 3}),
    "layers": lambda e, q, layers: dict(r=2, alpha=4, target_modules=(q,), layers_to_transform=[1],
                                        layers_pattern=layers),
    "layers-no-pattern": lambda e, q, layers: dict(r=2, alpha=4, target_modules=(q,), layers_to_transform=0),
}


def config(family: str, variant: str) -> LoRAConfig:
    return our_config(family, **VARIANTS[variant](*NAMES[family]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_peft(family: str, variant: str) -> None:
    """Same wrapped modules and seeded init (embedding: A = 0, B ~ N(0, 1)); logits, gradients and
    5 AdamW losses equal peft's."""
    cfg = config(family, variant)
    ours, pm = build_pair(family, cfg)
    mine, theirs = adapter_tensors(ours), peft_trainable(pm)
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert trainable_summary(ours) == _peft_summary(pm)
    if variant.startswith("embedding") or variant == "patterns":
        assert any(isinstance(m, LoRAEmbedding) for m in ours.modules())
    for name, module in ours.named_modules():
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            ref = pm.base_model.model.get_submodule(name)
            assert (module.r, module.scaling) == (ref.r["default"], ref.scaling["default"]), name

    randomize_both(ours, pm)
    inputs = batch(family)
    out, ref = ours(**inputs), pm(**inputs)
    assert_close(out.logits, ref.logits, **TOL)
    out.loss.backward()
    ref.loss.backward()
    for key in mine:
        assert_close(mine[key].grad, theirs[key].grad, **TOL, msg=key)

    ours.train()
    pm.train()
    opt_a = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        losses = []
        for model, opt in ((ours, opt_a), (pm, opt_b)):
            opt.zero_grad()
            torch.manual_seed(100 + step)
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(losses[0], losses[1], **TOL, msg=f"step {step}")


@pytest.mark.parametrize("variant", ["embedding", "patterns", "layers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_folders_both_ways(family: str, variant: str, tmp_path) -> None:
    """ours -> peft and peft -> ours give the same logits; save -> load is bitwise."""
    from peft import PeftModel
    ours, pm = build_pair(family, config(family, variant))
    randomize_both(ours, pm)
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    with torch.no_grad():
        expect = ours(**inputs).logits
    save_lora(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(base_model(family), tmp_path / "ours").eval()
    back = load_lora(base_model(family), tmp_path / "peft")
    again = load_lora(base_model(family), tmp_path / "ours")
    with torch.no_grad():
        assert_close(theirs(**inputs).logits, expect, **TOL)
        assert_close(back(**inputs).logits, expect, **TOL)
    saved = adapter_tensors(ours)
    assert sorted(adapter_tensors(back)) == sorted(saved)
    for key, value in adapter_tensors(again).items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_embedding_merge_unmerge_remove(family: str) -> None:
    """Merging into an untied embedding keeps the function; unmerge gives the weights back; remove
    gives back the same embedding object."""
    model = base_model(family)
    emb = model.get_input_embeddings()
    weight = emb.weight.detach().clone()
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    add_lora(model, config(family, "embedding"))
    randomize_both(model, build_pair(family, config(family, "embedding"))[1])
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merge_lora(model)
        merge_lora(model)
        assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(emb.weight, weight)
        unmerge_lora(model)
        assert_close(emb.weight, weight, atol=1e-6, rtol=1e-6)
    remove_lora(model)
    assert model.get_input_embeddings() is emb


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_tied_embedding_refuses_merge(family: str) -> None:
    """The input embedding shares its weight with lm_head: merging would change the head too."""
    model = add_lora(base_model(family), config(family, "embedding"))
    with pytest.raises(RuntimeError, match="weight is shared with.*lm_head"):
        merge_lora(model)
    with pytest.raises(RuntimeError, match="weight is shared with.*lm_head"):
        remove_lora(model, merge=True)
    assert not any(m.merged for m in model.modules() if isinstance(m, (LoRALinear, LoRAEmbedding)))


def test_layer_index_rule() -> None:
    """peft's reading of the layer index: the first numbered segment, or the one after a pattern."""
    assert layer_index("model.layers.1.self_attn.q_proj") == 1
    assert layer_index("model.layers.1.mlp.experts.0.w1") == 1
    assert layer_index("transformer.h.3.attn.c_attn", "h") == 3
    assert layer_index("model.layers.2.q_proj", ["blocks", "layers"]) == 2
    assert layer_index("lm_head") is None
    assert in_layers("model.layers.1.q", [0, 1]) and not in_layers("model.layers.1.q", 0)
    assert in_layers("anything", None)


def test_bad_pattern_inputs() -> None:
    """Clear errors naming the bad value; a failed add leaves the model unchanged."""
    with pytest.raises(ValueError, match=r"rank_pattern\['q'\]=0: expected a positive int"):
        LoRAConfig(rank_pattern={"q": 0})
    with pytest.raises(ValueError, match=r"alpha_pattern\['q'\]=nan"):
        LoRAConfig(alpha_pattern={"q": float("nan")})
    with pytest.raises(ValueError, match="key '\\(' is not a valid regular expression"):
        LoRAConfig(rank_pattern={"(": 2})
    with pytest.raises(ValueError, match="layers_to_transform=-1"):
        LoRAConfig(layers_to_transform=-1)
    with pytest.raises(ValueError, match="cannot be used with a regex"):
        LoRAConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern='layers' needs layers_to_transform"):
        LoRAConfig(layers_pattern="layers")
    model = base_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="matched no module in layers \\(7,\\)"):
        add_lora(model, LoRAConfig(target_modules=("q_proj",), layers_to_transform=[7]))
    with pytest.raises(ValueError, match="use_dora=True is not supported on the embedding 'model.embed_tokens'"):
        add_lora(model, LoRAConfig(target_modules=("embed_tokens", "q_proj"), use_dora=True))
    assert_unchanged(model, snap)


def test_saved_config_lists_patterns(tmp_path) -> None:
    cfg = LoRAConfig(r=4, target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3},
                     layers_to_transform=(1,), layers_pattern="layers")
    save_lora(add_lora(base_model("llama"), cfg), tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (raw["rank_pattern"], raw["alpha_pattern"]) == ({"v_proj": 2}, {"q_proj": 3})
    assert (raw["layers_to_transform"], raw["layers_pattern"]) == ([1], "layers")
