"""The prefix table (or its projection MLP), the backbone's key/value geometry, and the prefilled cache.

Shapes, with L layers, H key/value heads of width D (kv_width = H * D):
  encoder output   [n_virtual, 2 * L * kv_width]   fp32, one row per virtual position;
  per layer        key, value [B, H, n_virtual, D]  (the flat row is (layer, key|value, head, dim)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

# model_type values whose attention reads a standard DynamicCache and that are tested against peft
PREFIX_MODEL_TYPES = ("llama", "qwen2", "mistral", "gpt2", "bert")


@dataclass(frozen=True)
class PrefixGeometry:
    """How many layers get a prefix and the shape of each layer's keys and values."""

    n_layers: int   # attention layers, each with its own key and value prefix
    kv_heads: int   # key/value heads per layer (fewer than the query heads under GQA)
    head_dim: int   # width of one head

    @property
    def kv_width(self) -> int:
        """H * D: one layer's key (or value) width (peft: token_dim)."""
        return self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """2 * L * H * D: one virtual position's keys and values for every layer."""
        return 2 * self.n_layers * self.kv_width


def _first(cfg: Any, names: tuple[str, ...], what: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"the backbone config has none of {names}; cannot tell its {what}")


def prefix_geometry(backbone: nn.Module) -> PrefixGeometry:
    """Read the layer count and key/value shape from a supported backbone's config.

    GQA models (a ``num_key_value_heads`` field) get prefixes of ``num_key_value_heads`` heads of
    ``head_dim`` (the config's, else hidden / heads), as peft sizes them.

    Raises:
        ValueError: the architecture is not one prefix tuning supports (named with the list).
    """
    cfg = getattr(backbone, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in PREFIX_MODEL_TYPES:
        raise ValueError(f"prefix tuning supports model types {PREFIX_MODEL_TYPES}; got model_type="
                         f"{model_type!r} ({type(backbone).__name__})")
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{type(backbone).__name__} is an encoder-decoder; prefix tuning here supports "
                         "decoder-only and encoder-only backbones")
    n_layers = _first(cfg, ("num_hidden_layers", "num_layers", "n_layer"), "number of layers")
    hidden = _first(cfg, ("hidden_size", "n_embd", "d_model"), "hidden size")
    heads = _first(cfg, ("num_attention_heads", "n_head", "num_heads"), "number of attention heads")
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    if kv_heads is None:
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} attention heads")
        return PrefixGeometry(n_layers, heads, hidden // heads)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return PrefixGeometry(n_layers, int(kv_heads), int(head_dim))


class PrefixEncoder(nn.Module):
    """The trainable prefixes: a table [n_virtual, width], or a table [n_virtual, kv_width] and
    an MLP Linear(kv_width, H)-Tanh-Linear(H, width) (peft's module names: ``embedding``,
    ``transform``, so the RNG order and the parameter shapes are peft's)."""

    def __init__(self, n_virtual: int, geometry: PrefixGeometry, projection: bool = False,
                 hidden: int | None = None, init: str = "random") -> None:
        """Args:
            n_virtual: virtual positions.
            geometry: the backbone's layers and key/value shape.
            projection: reparameterize the table through the MLP.
            hidden: MLP width (default ``geometry.kv_width``).
            init: "random" (default inits) or "zero" (last Linear, or the table, at zero).
        """
        super().__init__()
        self.n_virtual, self.geometry, self.projection = n_virtual, geometry, projection
        self.transform: nn.Module | None = None
        if projection:
            hidden = hidden or geometry.kv_width
            self.embedding = nn.Embedding(n_virtual, geometry.kv_width)
            self.transform = nn.Sequential(nn.Linear(geometry.kv_width, hidden), nn.Tanh(),
                                           nn.Linear(hidden, geometry.width))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(n_virtual, geometry.width)
        if init == "zero":
            with torch.no_grad():
                if projection:
                    last.weight.zero_()
                    last.bias.zero_()
                else:
                    self.embedding.weight.zero_()

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        """Args:
            batch_size: None for one copy; B to broadcast the table over a batch first.
        Returns:
            [n_virtual, 2 * L * kv_width] (or [B, n_virtual, ...]), every layer's key and value
            prefix, fp32 (the MLP's dtype under autocast).

        With a batch the MLP runs on the broadcast table, as peft's does: under autocast its
        weight gradients are then one low-precision matmul over B * n rows, bit for bit peft's.
        """
        table = self.embedding.weight  # (n, kv_width) with projection, else (n, width)
        if batch_size is not None:
            table = table.expand(batch_size, -1, -1)  # (B, n, .), no copy
        return self.transform(table) if self.transform is not None else table


def prefix_cache(flat: torch.Tensor, geometry: PrefixGeometry) -> DynamicCache:
    """Split batched prefixes into a prefilled cache.

    Args:
        flat: [B, n_virtual, 2 * L * kv_width] in the backbone's dtype.
        geometry: the backbone's layers and key/value shape.
    Returns:
        a ``DynamicCache`` whose layer l holds key, value [B, H, n_virtual, D] (row chunk 2l is the
        key, 2l + 1 the value, as peft lays them out).
    """
    b, n, width = flat.shape
    if width != geometry.width:
        raise ValueError(f"prefix width {width}; expected 2 * layers * kv_width = {geometry.width}")
    kv = flat.view(b, n, 2 * geometry.n_layers, geometry.kv_heads, geometry.head_dim)
    kv = kv.permute(2, 0, 3, 1, 4)  # (2L, B, H, n, D)
    return DynamicCache(tuple((kv[2 * i], kv[2 * i + 1]) for i in range(geometry.n_layers)))
