"""Keep transformers' ``save_pretrained`` from writing a folder that reloads wrong.

A LoRA-adapted model's state dict names its frozen bases ``<p>.base_layer.weight``; transformers'
``from_pretrained`` does not know these keys and gives ``<p>.weight`` new random values (it only
reports unexpected keys). An NF4 layer's packed uint8 codes cannot be read back as a float
weight either. While a model holds LoRA adapters or NF4 layers, its ``save_pretrained`` (and
so ``push_to_hub``) therefore raises an error that names the functions that do save it
correctly; once the model is plain again (``remove_lora``, ``dequantize_model``) it works as
before.
"""
from __future__ import annotations

from typing import Any

from torch import nn

_ATTR = "save_pretrained"


class RefusedSave:
    """Stands in for a model's ``save_pretrained`` and raises ``RuntimeError(message)``."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(self.message)


def _message(lora: bool, nf4: bool) -> str:
    if lora:
        merge = ("lora.dequantize_model(model, dtype=torch.bfloat16), then "
                 "lora.remove_lora(model, merge=True)" if nf4 else "lora.remove_lora(model, merge=True)")
        return ("save_pretrained on a model with LoRA adapters would write '<name>.base_layer.weight' "
                "keys that transformers reloads as new random weights. Save the adapter with "
                "lora.save_lora(model, folder) and load it onto the base model with lora.load_lora; "
                f"for a full model, merge first ({merge}) and then call save_pretrained.")
    return ("save_pretrained on a model with NF4 layers would write packed 4-bit codes that "
            "transformers cannot read back as weights. Use lora.save_quantized(model, path) and "
            "lora.load_quantized, or lora.dequantize_model(model, dtype) first.")


def refresh_save_guard(model: nn.Module) -> None:
    """Refuse ``model.save_pretrained`` while it holds LoRA or NF4 layers; allow it otherwise.

    Only models whose class has a ``save_pretrained`` (transformers models) are touched.
    """
    from .inject import _has_lora  # late: inject imports this module
    from .nf4_linear import NF4Linear
    if not callable(getattr(type(model), _ATTR, None)):
        return
    lora = _has_lora(model)
    nf4 = any(isinstance(m, NF4Linear) for m in model.modules())
    if lora or nf4:
        model.__dict__[_ATTR] = RefusedSave(_message(lora, nf4))
    elif isinstance(model.__dict__.get(_ATTR), RefusedSave):
        del model.__dict__[_ATTR]
