"""Held-out evaluation: classifier accuracy, and answer-word accuracy for instruction models.

For an instruction-tuned causal LM the class is read from one position: the logits after the
prompt ``"Human: ...\\n\\nAssistant: "`` are compared at the first token of each answer word
("negative", "positive"); the larger one is the prediction. The same rule scores the model
before (zero-shot) and after training.
"""
from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch

from .data import PadCollator

__all__ = ["classify_accuracy", "answer_accuracy", "eval_loss", "answer_token_ids"]


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def classify_accuracy(model: torch.nn.Module, examples: list[dict], pad_id: int,
                      device: torch.device, batch_size: int = 64, padding_side: str = "right") -> dict:
    """Accuracy and mean loss of a sequence classifier on encoded ``{"input_ids", "labels"}``
    (``padding_side="left"`` for heads that read the last position without seeing pad ids)."""
    was_training = model.training
    model.eval()
    collate = PadCollator(pad_id=pad_id, side=padding_side)
    correct, loss_sum = 0, 0.0
    order = sorted(examples, key=lambda e: len(e["input_ids"]))  # similar lengths: little padding
    for chunk in _batches(order, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())  # logits (B, C)
        loss_sum += float(out.loss) * len(chunk)
    model.train(was_training)
    return {"accuracy": correct / len(examples), "eval_loss": loss_sum / len(examples)}


def answer_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The first token id of each answer word as the answer is tokenized in training."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer words {list(words)} share a first token {ids}; pick distinct words")
    return ids


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, examples: list[dict], answer_ids: Sequence[int], pad_id: int,
                    device: torch.device, batch_size: int = 16) -> dict:
    """Accuracy of picking ``answer_ids[label]`` among ``answer_ids`` after each prompt.

    Args:
        model: a causal LM (possibly adapted); logits (B, P + T, V) where P virtual tokens may
            come first.
        examples: encoded instruction examples with ``prompt_len`` and an integer ``label``.
        answer_ids: one token id per class.
        pad_id: padding id (right padding; the prompt's last position is gathered).
        device: where to run.
        batch_size: prompts per forward.
    Returns:
        ``{"accuracy": float}``.
    """
    was_training = model.training
    model.eval()
    collate = PadCollator(pad_id=pad_id)
    choices = torch.tensor(list(answer_ids), device=device)
    keep_ok = _accepts_logits_to_keep(model)
    # prompts sorted by length: little padding, and only the last few positions need logits
    order = sorted(examples, key=lambda e: e["prompt_len"])
    correct = 0
    for chunk in _batches(order, batch_size):
        prompts = [{"input_ids": e["input_ids"][:e["prompt_len"]]} for e in chunk]
        batch = {k: v.to(device) for k, v in collate(prompts).items()}
        width = batch["input_ids"].shape[1]
        lengths = batch["attention_mask"].sum(1)  # (B,)
        keep = int(width - lengths.min()) + 1  # right padding: every row's last real position
        extra = {"logits_to_keep": keep} if keep_ok else {}
        logits = model(**batch, **extra).logits  # (B, kept, V)
        if keep_ok:  # the kept positions are the last `keep` of the input
            last = lengths - 1 - (width - keep)  # (B,)
        else:  # all positions, after any virtual tokens a prompt wrapper prepended
            last = lengths - 1 + (logits.shape[1] - width)  # (B,)
        rows = logits[torch.arange(len(chunk), device=device), last]  # (B, V)
        pred = rows[:, choices].argmax(-1).cpu()  # (B,) index into answer_ids
        correct += sum(int(p) == e["label"] for p, e in zip(pred.tolist(), chunk))
    model.train(was_training)
    return {"accuracy": correct / len(examples)}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    # transformers causal LMs can skip the (T, V) logits of positions nobody reads
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def eval_loss(model: torch.nn.Module, examples: list[dict], pad_id: int, device: torch.device,
              batch_size: int = 16) -> dict:
    """Mean per-token loss of a causal LM on encoded instruction examples (answer tokens only)."""
    was_training = model.training
    model.eval()
    collate = PadCollator(pad_id=pad_id)
    total, count = 0.0, 0
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    return {"eval_loss": total / count if count else math.nan}
