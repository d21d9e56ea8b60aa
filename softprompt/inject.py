"""prepend_prompt: the one pure function that puts virtual tokens in front of a batch."""
from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100  # the label HF losses skip


def prepend_prompt(prompt: torch.Tensor, inputs_embeds: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                   token_type_ids: Optional[torch.Tensor] = None, insert_at: int = 0) -> dict[str, torch.Tensor]:
    """Insert a soft prompt into a batch; nothing is modified in place.

    Args:
        prompt: [n, d] virtual-token embeddings (any dtype; broadcast to [B, n, d], then cast
            to ``inputs_embeds.dtype``).
        inputs_embeds: [B, L, d] token embeddings (from ``get_input_embeddings()``).
        attention_mask: optional [B, L]; the prompt columns are ones of the same dtype.
        labels: optional [B, L] token labels; the prompt columns are -100. Per-sequence labels
            (classification, 1-D) are left alone.
        token_type_ids: optional [B, L]; the prompt columns are 0.
        insert_at: sequence index where the prompt goes: 0 prepends (peft); 1 keeps the first
            real token (e.g. [CLS]) in front of the prompt.
    Returns:
        a dict with ``inputs_embeds`` [B, n+L, d] and, where given, ``attention_mask``,
        ``labels`` and ``token_type_ids`` widened to [B, n+L].
    """
    if prompt.dim() != 2 or inputs_embeds.dim() != 3 or prompt.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(f"prompt {tuple(prompt.shape)} and inputs_embeds {tuple(inputs_embeds.shape)}; "
                         "expected [n, d] and [B, L, d] with the same d")
    b, length, _ = inputs_embeds.shape
    if not 0 <= insert_at <= length:
        raise ValueError(f"insert_at={insert_at}; expected 0 <= insert_at <= L={length}")
    n = prompt.shape[0]
    # Broadcast over the batch BEFORE the cast (peft: repeat, then .to). Under autocast the
    # encoder's prompt is bf16; the backward then sums the B per-row gradients in bf16, as peft's
    # does. Casting first would sum them in fp32 and round once: a different encoder gradient.
    block = prompt.expand(b, n, -1).to(inputs_embeds.dtype)  # (B, n, d)
    out = {"inputs_embeds": _insert(inputs_embeds, block, insert_at)}
    for name, value, fill in (("attention_mask", attention_mask, 1), ("labels", labels, IGNORE_INDEX),
                              ("token_type_ids", token_type_ids, 0)):
        if value is None:
            continue
        if name == "labels" and value.dim() != 2:
            out[name] = value  # one label per sequence: nothing to pad
            continue
        if value.shape != (b, length):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {(b, length)}")
        out[name] = _insert(value, value.new_full((b, n), fill), insert_at)
    return out


def _insert(x: torch.Tensor, block: torch.Tensor, at: int) -> torch.Tensor:
    """cat(x[:, :at], block, x[:, at:]) along dim 1."""
    if at == 0:
        return torch.cat([block, x], dim=1)
    return torch.cat([x[:, :at], block, x[:, at:]], dim=1)
