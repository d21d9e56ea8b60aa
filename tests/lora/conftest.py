"""Shared builders for the LoRA tests: our model and peft's reference, built the same way."""
from __future__ import annotations

import warnings

import pytest
import torch

from lora import LoRAConfig, add_lora
from lora.inject import adapter_tensors
from tests.models import CAUSAL_FAMILIES, tiny_bert_classifier, tiny_causal_lm

FAMILIES = (*CAUSAL_FAMILIES, "bert")

# variant name -> our LoRAConfig kwargs (peft's are derived in `peft_config`)
VARIANTS = {
    "lora": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=16, use_rslora=True),
    "dora": dict(r=4, alpha=8, use_dora=True),
    "all-linear": dict(r=2, alpha=4, target_modules="all-linear"),
}


def base_model(family: str) -> torch.nn.Module:
    """A fresh tiny fp32 model (bitwise the same on every call)."""
    return tiny_bert_classifier() if family == "bert" else tiny_causal_lm(family)


def our_config(family: str, **kw) -> LoRAConfig:
    if family == "bert":  # the classification head trains in full, like peft's SEQ_CLS
        kw.setdefault("modules_to_save", ("classifier",))
    return LoRAConfig(**kw)


def peft_config(family: str, cfg: LoRAConfig):
    from peft import LoraConfig
    targets = cfg.target_modules if isinstance(cfg.target_modules, (str, type(None))) else list(cfg.target_modules)
    layers = list(cfg.layers_to_transform) if isinstance(cfg.layers_to_transform, tuple) else cfg.layers_to_transform
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, bias=cfg.bias,
                      rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern),
                      layers_to_transform=layers, layers_pattern=cfg.layers_pattern,
                      task_type="SEQ_CLS" if family == "bert" else "CAUSAL_LM")


def build_pair(family: str, cfg: LoRAConfig, seed: int = 1):
    """(ours, peft's) from bitwise-equal bases, each created after ``torch.manual_seed(seed)``."""
    from peft import get_peft_model
    ours, ref = base_model(family), base_model(family)
    torch.manual_seed(seed)
    add_lora(ours, cfg)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(ref, peft_config(family, cfg))
    return ours, pm


def peft_key(name: str) -> str:
    """peft's in-model parameter name -> our saved-key scheme."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    name = name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
    return name.replace("modules_to_save.", "")


def peft_trainable(pm) -> dict[str, torch.nn.Parameter]:
    return {peft_key(n): p for n, p in pm.named_parameters() if p.requires_grad}


def randomize_both(ours, pm, seed: int = 2) -> None:
    """Give both models the same non-zero adapter values (B != 0, magnitude != norm)."""
    mine, theirs = adapter_tensors(ours), peft_trainable(pm)
    assert set(mine) == set(theirs), set(mine) ^ set(theirs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(mine):
            value = torch.randn(mine[key].shape, generator=g).to(mine[key].device) * 0.2
            if key.endswith("lora_magnitude_vector"):
                value = mine[key] * (1 + value)
            elif key.endswith("ia3_l"):  # IA3 vectors scale around 1
                value = 1 + value
            mine[key].copy_(value)
            theirs[key].copy_(value)


def batch(family: str, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # some padding
    labels = torch.tensor([0, 2]) if family == "bert" else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def snapshot(model):
    """Module objects and parameter values/flags, to prove a failed call changed nothing."""
    return ({n: m for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def assert_unchanged(model, snap) -> None:
    modules, params = snap
    assert {n: m for n, m in model.named_modules()}.keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n][0]) and p.requires_grad == params[n][1], n
    assert not hasattr(model, "_lora_state")
