"""SoftPrompt: the fp32 [n_virtual, d] table of virtual-token embeddings and its inits."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn


def fit_ids(ids: Sequence[int], n_virtual: int, allow_truncate: bool, what: str) -> list[int]:
    """Repeat the whole id list until it covers n_virtual, or cut it (only with consent).

    Args:
        ids: token ids (non-empty).
        n_virtual: the number of ids wanted.
        allow_truncate: whether a list longer than n_virtual may be cut to its first n_virtual ids.
        what: a description of the ids for error messages.
    Returns:
        exactly n_virtual ids; ``[BOS,a,b]`` with 7 gives ``[BOS,a,b,BOS,a,b,BOS]`` (peft's rule).
    """
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError(f"{what} gave no token ids; expected at least one")
    if len(ids) > n_virtual and not allow_truncate:
        raise ValueError(f"{what} gives {len(ids)} token ids but n_virtual={n_virtual}; raise n_virtual "
                         "or set truncate_init_text=True to keep only the first n_virtual ids")
    reps = math.ceil(n_virtual / len(ids))
    return (ids * reps)[:n_virtual]


class SoftPrompt(nn.Module):
    """A trainable fp32 table ``weight`` of shape [n_virtual, d]; ``forward()`` returns it.

    The random init draws N(0, 1) exactly as ``nn.Embedding`` does, so a seeded build matches
    peft's ``PromptEmbedding`` bit for bit; the other inits overwrite that draw afterwards (peft
    consumes the RNG the same way).
    """

    def __init__(self, n_virtual: int, dim: int) -> None:
        """Args:
            n_virtual: number of virtual tokens (> 0).
            dim: embedding width d (> 0).
        """
        super().__init__()
        if n_virtual <= 0 or dim <= 0:
            raise ValueError(f"SoftPrompt(n_virtual={n_virtual}, dim={dim}); expected both > 0")
        self.weight = nn.Parameter(torch.empty(n_virtual, dim, dtype=torch.float32))
        nn.init.normal_(self.weight)  # the nn.Embedding default init

    @property
    def n_virtual(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self) -> torch.Tensor:
        """Returns: the table, [n_virtual, d] fp32."""
        return self.weight

    @torch.no_grad()
    def init_from_ids(self, embedding: nn.Module, ids: Sequence[int]) -> None:
        """Set row i to ``embedding(ids[i])`` cast to fp32 (through the module's forward, so scaled
        embeddings keep their scale).

        Args:
            embedding: the backbone's input embedding (``get_input_embeddings()``).
            ids: exactly n_virtual token ids.
        """
        if len(ids) != self.n_virtual:
            raise ValueError(f"got {len(ids)} ids for a table of n_virtual={self.n_virtual}")
        device = _module_device(embedding)
        rows = embedding(torch.tensor(list(ids), dtype=torch.long, device=device))  # (n, d)
        if rows.shape[-1] != self.dim:
            raise ValueError(f"embedding width {rows.shape[-1]} != prompt width {self.dim}")
        self.weight.copy_(rows.detach().to(torch.float32))

    def init_from_text(self, embedding: nn.Module, tokenizer: Any, text: str,
                       allow_truncate: bool = False) -> list[int]:
        """Tokenize ``text`` with special tokens, fit to n_virtual ids, look them up.

        Args:
            embedding: the backbone's input embedding.
            tokenizer: a Hugging Face tokenizer (callable returning ``input_ids``).
            text: the init text.
            allow_truncate: consent to cut a text longer than n_virtual tokens.
        Returns:
            the n_virtual ids used.
        """
        if tokenizer is None:
            raise ValueError("init='text' needs a tokenizer: pass tokenizer= to PromptModel")
        ids = fit_ids(tokenizer(text)["input_ids"], self.n_virtual, allow_truncate, f"init_text {text!r}")
        self.init_from_ids(embedding, ids)
        return ids

    def init_from_vocab(self, embedding: nn.Module, vocab_size: Optional[int] = None) -> list[int]:
        """Copy rows of randomly drawn vocabulary ids (peft's SAMPLE_VOCAB: one randint draw).

        Args:
            embedding: the backbone's input embedding.
            vocab_size: ids are drawn from [0, vocab_size); default ``embedding.num_embeddings``.
        Returns:
            the ids drawn.
        """
        vocab_size = vocab_size if vocab_size is not None else embedding.num_embeddings
        ids = torch.randint(0, vocab_size, (self.n_virtual,), dtype=torch.long).tolist()
        self.init_from_ids(embedding, ids)
        return ids


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
