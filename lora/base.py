"""AdapterLayer: what every wrapper of one frozen base module provides to the injection code.

``lora.inject`` swaps a targeted module for a wrapper and later puts the very same base object
back; it needs nothing from a wrapper but this small surface, so LoRA (linear and embedding),
IA3 and any later weight-side method share one surgery, one walk and one save/load path.
"""
from __future__ import annotations

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """Base of every weight-side wrapper: holds the frozen ``base_layer`` plus trainable tensors.

    A subclass sets ``self.base_layer`` and ``self.merged`` in its constructor and implements:

    - ``adapter_params()``: its trainable tensors by local name (saved under ``<module path>.<name>``);
    - ``merge()`` / ``unmerge()``: fold the adapter into the base weight and back (idempotent);
    - ``_check_mergeable()`` / ``_check_unmergeable()``: raise before any layer is touched when
      merging / unmerging is impossible.
    """

    base_layer: nn.Module
    merged: bool

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's own trainable tensors by local name, e.g. ``{"lora_A.weight": ...}``."""
        raise NotImplementedError

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def _check_mergeable(self) -> None:
        """Default: mergeable unless the base weight is quantized (packed codes / ``dequantize``)."""
        weight = getattr(self.base_layer, "weight", None)
        packed = isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point
        if packed or callable(getattr(self.base_layer, "dequantize", None)):
            raise RuntimeError(
                f"cannot merge {type(self).__name__} into a quantized {type(self.base_layer).__name__}: "
                f"re-quantizing the merged weight is lossy. Call lora.dequantize_model(model, dtype=...) first.")

    def _check_unmergeable(self) -> None:
        """Raise before any layer is touched when ``unmerge`` cannot restore the base (default: never)."""

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (some model code reads ``proj.weight``)."""
        return self.base_layer.weight
