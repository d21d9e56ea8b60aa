"""LoRAEmbedding: a frozen ``nn.Embedding`` plus a trainable low-rank update of its table.

    W: [V, d] (num_embeddings x embedding_dim)      A = lora_embedding_A: [r, V]    B = lora_embedding_B: [d, r]
    y = embed(ids; W) + embed(ids; A^T) @ B^T * scaling     ids: (...)  ->  y: (..., d)
    scaling = alpha / r   (alpha / sqrt(r) with rsLoRA);  merged: W <- W + (B @ A)^T * scaling

A starts at zero and B ~ N(0, 1), so the wrapper starts equal to the base (peft's init, the
transpose of the linear case). The lookup into A^T uses the base's ``padding_idx`` / ``max_norm``
arguments, so the padding row of A gets no gradient, as in the base. No dropout on this branch
(peft applies none to embeddings either).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer
from .layer import _adapter_place


class LoRAEmbedding(AdapterLayer):
    """A frozen ``base_layer`` (``nn.Embedding``) plus ``lora_embedding_A`` / ``lora_embedding_B``.

    Args:
        base: the embedding to adapt (weight [V, d]).
        r: rank (> 0).
        alpha: scaling numerator.
        use_rslora: scaling = alpha / sqrt(r) instead of alpha / r.

    Init (same draws, same order, as peft on the default generator): A [r, V] and B [d, r] are
    first drawn from N(0, 1), then A is zeroed and B re-drawn from N(0, 1). Adapters live in fp32;
    on a 16-bit base their initial values are rounded to that dtype first.
    """

    def __init__(self, base: nn.Embedding, r: int = 8, alpha: float = 8, use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRAEmbedding r={r!r}: expected a positive int")
        self.base_layer = base
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_embedding_A = nn.Parameter(torch.randn(r, self.num_embeddings))  # [r, V]; draw 1
        self.lora_embedding_B = nn.Parameter(torch.randn(self.embedding_dim, r))   # [d, r]; draw 2
        with torch.no_grad():
            self.lora_embedding_A.zero_()
            self.lora_embedding_B.normal_()                                        # draw 3
            device, low = _adapter_place(base)
            for p in (self.lora_embedding_A, self.lora_embedding_B):
                p.data = p.data.to(device=device, dtype=low).float()
        self.merged = False

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """``lora_embedding_A`` [r, V] and ``lora_embedding_B`` [d, r] (peft's key names)."""
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}

    def delta_weight(self) -> torch.Tensor:
        """(B @ A)^T * scaling as fp32 [V, d]."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t() * self.scaling

    def _embed_scale(self) -> Any:
        """The base's own output scale (e.g. Gemma's scaled embeddings), applied to the update too."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        return scale if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """ids: (...) integer -> (..., d) in the base output dtype."""
        result = self.base_layer(ids, *args, **kwargs)
        if self.merged:
            return result
        base = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                              sparse=base.sparse)                                  # (..., r)
        update = (after_a @ self.lora_embedding_B.t()) * self.scaling               # (..., d)
        scale = self._embed_scale()
        if scale is not None:
            update = update * (scale.to(update.dtype) if isinstance(scale, torch.Tensor) else scale)
        return (result + update).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta, computed in fp32. Idempotent."""
        if self.merged:
            return
        self._check_mergeable()
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to fp32 rounding). Idempotent."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.6g}, merged={self.merged}"
