"""Builders shared by the softprompt tests: ours and peft's model from the same seed."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch

from softprompt import PromptConfig, PromptModel
from tests.models import tiny_causal_lm, tiny_classifier, tiny_tokenizer

peft = pytest.importorskip("peft")

INIT_TEXT = "下面是一段人与机器人的对话。"
SEED = 1234


def peft_config(cfg: PromptConfig, task: str, tokenizer_path: Optional[str] = None):
    """The peft config equivalent to ours."""
    task_type = peft.TaskType.CAUSAL_LM if task == "causal_lm" else peft.TaskType.SEQ_CLS
    if cfg.method == "prompt":
        init = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}[cfg.init]
        return peft.PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=cfg.n_virtual, prompt_tuning_init=init,
            prompt_tuning_init_text=cfg.init_text, tokenizer_name_or_path=tokenizer_path)
    enc = {"mlp": peft.PromptEncoderReparameterizationType.MLP,
           "lstm": peft.PromptEncoderReparameterizationType.LSTM}[cfg.encoder]
    return peft.PromptEncoderConfig(
        task_type=task_type, num_virtual_tokens=cfg.n_virtual, encoder_reparameterization_type=enc,
        encoder_hidden_size=cfg.encoder_hidden, encoder_num_layers=cfg.encoder_num_layers,
        encoder_dropout=cfg.encoder_dropout)


def build_backbone(family: str, task: str):
    return tiny_causal_lm(family) if task == "causal_lm" else tiny_classifier(family, num_labels=3)


def build_pair(family: str, cfg: PromptConfig, task: str = "causal_lm", tmp_path: Optional[Path] = None):
    """(ours, peft's), each on its own fresh backbone, prompts drawn from the same seed."""
    tokenizer, tok_path = None, None
    if cfg.init == "text":
        tokenizer = tiny_tokenizer()
        tok_path = str(tmp_path / "tokenizer")
        tokenizer.save_pretrained(tok_path)
    backbone = build_backbone(family, task)
    torch.manual_seed(SEED)
    ours = PromptModel(backbone, cfg, tokenizer=tokenizer, task=task)
    ref_backbone = build_backbone(family, task)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(ref_backbone, peft_config(cfg, task, tok_path))
    return ours, ref


def peft_prompt_params(ref) -> dict[str, torch.nn.Parameter]:
    """peft's prompt-encoder parameters under our names (SoftPrompt's is just 'weight')."""
    named = dict(ref.prompt_encoder["default"].named_parameters())
    if set(named) == {"embedding.weight"}:
        return {"weight": named["embedding.weight"]}
    return named


def peft_head_params(ref) -> dict[str, torch.nn.Parameter]:
    """peft's trainable head copy under our names ('weight', 'bias')."""
    out = {}
    for name, p in ref.named_parameters():
        if "modules_to_save.default." in name:
            out[name.split("modules_to_save.default.")[1]] = p
    return out


def batch(family: str = "llama", b: int = 3, length: int = 7, pad: str = "right", seed: int = 0,
          token_types: bool = False) -> dict[str, torch.Tensor]:
    """Random ids in [3, 500) with ragged lengths; pads (id 0, mask 0) on the given side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for row in range(1, b):
        n_pad = min(row * 2, length - 2)
        if pad == "right":
            mask[row, length - n_pad:] = 0
        elif pad == "left":
            mask[row, :n_pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = (torch.arange(length)[None] >= length // 2).long().expand(b, -1) * mask
    return out


def causal_labels(data: dict[str, torch.Tensor]) -> torch.Tensor:
    return data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
