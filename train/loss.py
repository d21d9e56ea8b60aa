"""The training loss: for causal LMs the output head runs only where a label is.

An instruction batch labels a few answer tokens per row, yet a plain forward runs the output
head (hidden -> vocabulary) and the cross-entropy at every position. ``batch_loss`` in mode
``"labelled"`` runs the model's own forward with two hooks instead:

1. a forward pre-hook on the Hugging Face causal LM (found inside any wrapper) takes the
   ``labels`` it receives, so the model computes no loss of its own; a wrapper that widens the
   labels (``softprompt.PromptModel`` gives its virtual positions -100) is honoured as is;
2. a forward pre-hook on its output head (``get_output_embeddings()``) keeps the hidden states
   (B, T, d) and hands the head a single probe row instead of all B x T.

Then the head and cross-entropy run on the hidden rows whose shifted label is not -100,
``chunk_size`` rows at a time; with more than one chunk each chunk is recomputed in backward
(``torch.utils.checkpoint``), so at most one chunk of logits (chunk x V) is alive at a time.
The probe row tells whether the model transforms its logits after the head (Gemma's
``final_logit_softcapping``, Granite's or Cohere's logit scale): a softcap named by the config
and a constant scale are honoured, anything else is refused with a message to use ``"full"``.

Nothing here knows an adapter method: LoRA, QLoRA, prompt tuning, P-Tuning and any later
method whose model calls a Hugging Face causal LM get it. Mode ``"full"`` (and every batch
with per-sequence labels, i.e. classification) is the model's own ``forward(...).loss``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["LOSS_MODES", "batch_loss", "labelled_loss", "find_causal_lm"]

LOSS_MODES = ("labelled", "full")
IGNORE_INDEX = -100


def batch_loss(model: nn.Module, batch: dict, mode: str = "labelled", chunk_size: int = 1024) -> torch.Tensor:
    """The mean loss of one batch, as the model's own loss defines it.

    Args:
        model: any module whose ``forward(**batch)`` returns ``.loss`` and ``.logits``.
        batch: keyword arguments of the forward (extra keys such as ``position_ids`` pass through).
        mode: "labelled" (head only on labelled positions, causal LMs) or "full" (the model's own).
        chunk_size: labelled rows per head + cross-entropy chunk.
    Returns:
        a scalar; 0 connected to the graph when no position is labelled (so every DDP rank
        still runs its backward).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode={mode!r}; expected one of {LOSS_MODES}")
    labels = batch.get("labels")
    token_labels = labels is not None and labels.dim() == 2
    if mode == "labelled" and token_labels and find_causal_lm(model) is not None:
        return labelled_loss(model, batch, chunk_size)
    out = model(**batch)
    if token_labels and not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        return out.logits.float().sum() * 0.0  # the model's mean would be 0/0
    return out.loss


def find_causal_lm(model: nn.Module) -> Optional[nn.Module]:
    """The first Hugging Face model inside ``model`` (itself included) that has an output head."""
    from transformers import PreTrainedModel
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    return None


def labelled_loss(model: nn.Module, batch: dict, chunk_size: int = 1024) -> torch.Tensor:
    """Shifted token cross-entropy with the output head run only on labelled positions.

    Equals the model's own causal-LM loss (the mean over positions whose next-token label is
    not -100) and its gradients, up to float summation order.

    Args:
        model: a causal LM, or a wrapper (e.g. ``PromptModel``) that calls one.
        batch: forward kwargs with ``labels`` (B, T).
        chunk_size: labelled rows per chunk (>= 1).
    Returns:
        the scalar mean loss.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected >= 1")
    lm = find_causal_lm(model)
    if lm is None:
        raise ValueError(f"{type(model).__name__} holds no Hugging Face model with an output head; "
                         "use loss mode 'full'")
    head = lm.get_output_embeddings()
    seen: dict = {}

    def take_labels(module, args, kwargs):
        if "labels" not in seen:
            seen["labels"] = kwargs.pop("labels", None)
        return args, kwargs

    def take_hidden(module, args):
        if "hidden" in seen:  # a second call of the head (not the final projection): leave it
            return None
        seen["hidden"] = args[0]  # (B, T, d)
        return (args[0][:1, :1],) + tuple(args[1:])  # the probe row (1, 1, d)

    def take_probe(module, args, output):
        seen.setdefault("probe", output)  # head(probe row), before any post-head transform

    handles = [lm.register_forward_pre_hook(take_labels, with_kwargs=True),
               head.register_forward_pre_hook(take_hidden), head.register_forward_hook(take_probe)]
    try:
        out = model(**batch)
    finally:
        for h in handles:
            h.remove()
    labels, hidden = seen.get("labels"), seen.get("hidden")
    if labels is None:
        raise ValueError(f"{type(lm).__name__} received no labels; pass labels=... as a keyword")
    if hidden is None:
        raise ValueError(f"{type(lm).__name__} never called its output head {type(head).__name__}; "
                         "use loss mode 'full'")
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"the output head saw hidden states {tuple(hidden.shape)} for labels "
                         f"{tuple(labels.shape)}; expected one row per label (use loss mode 'full')")
    post = _post_head(lm, seen["probe"], out.logits)
    targets = labels[:, 1:]                      # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    rows = hidden[:, :-1][keep]                  # (N, d)
    wanted = targets[keep]                       # (N,)
    n = wanted.numel()
    if n == 0:
        return hidden.float().sum() * 0.0        # no target: 0, still connected to the graph
    total = None
    for i in range(0, n, chunk_size):
        args = (rows[i:i + chunk_size], wanted[i:i + chunk_size], head, post)
        part = (checkpoint(_chunk_loss, *args, use_reentrant=False) if n > chunk_size
                else _chunk_loss(*args))
        total = part if total is None else total + part
    return total / n


def _chunk_loss(rows: torch.Tensor, wanted: torch.Tensor, head: nn.Module, post) -> torch.Tensor:
    logits = head(rows)                          # (c, V)
    if post is not None:
        logits = post(logits)
    return F.cross_entropy(logits.float(), wanted, reduction="sum")


def _post_head(lm: nn.Module, raw: torch.Tensor, final: torch.Tensor):
    """What the model does to the head's output, read from the probe row: None (nothing), a
    softcap from the config, or a constant scale. Anything else raises."""
    raw, final = raw.detach().reshape(-1), final.detach().reshape(-1)
    if raw.shape != final.shape:
        raise ValueError(f"the model returned logits {tuple(final.shape)} for the head's "
                         f"{tuple(raw.shape)}; use loss mode 'full'")
    if torch.equal(raw.float(), final.float()):
        return None
    tol = dict(rtol=1e-5, atol=1e-6) if final.dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    cfg = getattr(lm, "config", None)
    cap = getattr(cfg.get_text_config(), "final_logit_softcapping", None) if cfg is not None else None
    if cap:
        def post(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x / cap) * cap
        if torch.allclose(post(raw).float(), final.float(), **tol):
            return post
    x, y = raw.double(), final.double()
    scale = float((x * y).sum() / (x * x).sum().clamp_min(1e-30))
    if torch.allclose((x * scale).float(), y.float(), **tol):
        return lambda logits: logits * scale
    raise ValueError(f"{type(lm).__name__} transforms its logits after the output head in a way the "
                     "labelled-only loss does not reproduce; use loss mode 'full'")
