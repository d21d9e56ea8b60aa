"""Builders shared by the prefix-tuning tests: ours and peft's model from the same seed."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version

from softprompt import PrefixConfig, PrefixModel
from tests.models import tiny_causal_lm, tiny_classifier

SEED = 4321
CAUSAL = ["llama", "qwen2", "mistral", "gpt2"]  # the GQA families, then gpt2
SEQ_CLS = ["bert", "llama", "qwen2", "mistral", "gpt2"]
# peft 0.21.2 re-injects the prefix at every decode step on transformers >= 5.24 (cache renamed),
# so its generate() is a valid reference only below that
PEFT_GENERATE_OK = Version(transformers.__version__) < Version("5.24.0")
# and its SEQ_CLS prefix path raises there ("Model does not support past key values"): it looks for
# `past_key_values` in the forward's signature
PEFT_SEQ_CLS_OK = PEFT_GENERATE_OK
PEFT_SEQ_CLS_SKIP = "peft 0.21.2's SEQ_CLS prefix tuning raises on transformers >= 5.24 (cache kwarg renamed)"


def peft_case(task: str) -> list:
    """pytest marks for a peft comparison of ``task`` on this transformers version."""
    return [pytest.mark.skipif(task == "seq_cls" and not PEFT_SEQ_CLS_OK, reason=PEFT_SEQ_CLS_SKIP)]


def backbone(family: str, task: str) -> torch.nn.Module:
    return tiny_causal_lm(family) if task == "causal_lm" else tiny_classifier(family, num_labels=3)


def peft_prefix_config(cfg: PrefixConfig, task: str):
    import peft
    return peft.PrefixTuningConfig(
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS", num_virtual_tokens=cfg.n_virtual,
        prefix_projection=cfg.projection, encoder_hidden_size=cfg.encoder_hidden,
        init_weights="zero" if cfg.init == "zero" else None)


def build_prefix_pair(family: str, cfg: PrefixConfig, task: str = "causal_lm"):
    """(ours, peft's), each on its own fresh backbone, prefixes drawn from the same seed."""
    import peft
    ours_backbone = backbone(family, task)
    torch.manual_seed(SEED)
    ours = PrefixModel(ours_backbone, cfg, task=task)
    ref_backbone = backbone(family, task)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(ref_backbone, peft_prefix_config(cfg, task))
    return ours, ref


def peft_encoder_params(ref) -> dict[str, torch.nn.Parameter]:
    """peft's prefix-encoder parameters (the same names as ours: embedding.*, transform.*)."""
    return dict(ref.prompt_encoder["default"].named_parameters())


def peft_head_params(ref) -> dict[str, torch.nn.Parameter]:
    """peft's trainable head copy under our names ('weight', 'bias')."""
    return {name.split("modules_to_save.default.")[1]: p for name, p in ref.named_parameters()
            if "modules_to_save.default." in name}


def ragged_batch(b: int = 3, length: int = 7, pad: str = "right", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids in [3, 500); row r > 0 has 2r pads (id 0, mask 0) on the given side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for row in range(1, b):
        n_pad = min(2 * row, length - 2)
        if pad == "right":
            mask[row, length - n_pad:] = 0
        else:
            mask[row, :n_pad] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def labels_for(task: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
    if task == "causal_lm":
        return data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    return torch.tensor([0, 2, 1][: data["input_ids"].shape[0]])


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())
