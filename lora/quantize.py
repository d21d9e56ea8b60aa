"""Quantize a whole model to NF4 in place, undo it, report its size, save and load it.

``quantize_model`` swaps every ``nn.Linear`` and transformers ``Conv1D`` (except the output
head, tied weights and LoRA's own A/B matrices) for an ``NF4Linear``, one layer at a time,
dropping each dense weight as soon as its 4-bit copy exists. Given ``checkpoint=`` (safetensors
file(s)) the model may live on the meta device: ``lora.stream.load_streamed`` then reads each
tensor only when its layer is quantized, so peak memory stays near the quantized size plus one
dense layer.

``dequantize_model`` turns every ``NF4Linear`` (including a LoRALinear's base) back into an
``nn.Linear`` in a 16/32-bit dtype, the step before merging adapters; calling
``quantize_model`` again afterwards is the explicit re-quantize step.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write
from .hf_save import refresh_save_guard
from .nf4_linear import NF4Linear, quant_state_from_tensors
from .stream import NF4Config, _materialize_leftovers, _parent, _quantizable, _tie_groups, nf4_layer

_ADAPTER_CHILDREN = ("lora_A", "lora_B")  # LoRA's trainable linears are never quantized


def quantize_model(model: nn.Module, skip: Sequence[str] = ("lm_head",), blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None,
                   quant_type: str = "nf4", rounding: str = "auto",
                   checkpoint: Optional[str | os.PathLike | Sequence[str | os.PathLike]] = None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """Replace the model's ``nn.Linear`` and ``Conv1D`` layers by ``NF4Linear``, in place.

    Args:
        model: any module; with ``checkpoint`` it may be on the meta device.
        skip: module names (exact or dotted suffix) left dense, e.g. the output head. A linear
            whose weight is tied to another tensor always stays dense.
        blocksize, double_quant, quant_type, rounding: see ``lora.nf4.quantize_nf4``.
        compute_dtype: matmul dtype of the quantized layers (None: the input's dtype).
        checkpoint: optional safetensors file (or the files of a sharded checkpoint) with the
            dense weights; every tensor is read from it (``lora.stream.load_streamed``), tied
            weights are tied again.
        device: where tensors read from ``checkpoint`` are placed.
    Returns:
        The same model object.
    """
    cfg = NF4Config(skip=tuple(skip), blocksize=blocksize, double_quant=double_quant,
                    quant_type=quant_type, compute_dtype=compute_dtype, rounding=rounding)
    if checkpoint is not None:
        from .stream import load_streamed
        return load_streamed(model, checkpoint, quantize=cfg, device=device)
    tied = {n for names in _tie_groups(model).values() for n in names}
    done: dict[int, NF4Linear] = {}  # id(linear) -> its replacement (shared modules stay shared)
    # names only: a list of modules would keep every dense weight alive until the end
    names = [n for n, m in model.named_modules() if _quantizable(n, m, cfg, tied)]
    for name in names:
        parent, attr = _parent(model, name)
        module = getattr(parent, attr)
        if attr in _ADAPTER_CHILDREN and hasattr(parent, "base_layer"):
            continue
        if id(module) not in done:
            done[id(module)] = nf4_layer(module, cfg)
        setattr(parent, attr, done[id(module)])  # the dense weight is freed here
        del module
    refresh_save_guard(model)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every ``NF4Linear`` by an ``nn.Linear`` holding its dequantized weight, in place.

    Args:
        model: a model containing ``NF4Linear`` layers (also as a LoRALinear's base).
        dtype: dtype of the dense weights and biases.
    Returns:
        The same model object.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            parent, attr = _parent(model, name)
            setattr(parent, attr, module.to_linear(dtype))
    refresh_save_guard(model)
    return model


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """Storage of a (partly) quantized model."""
    quantized_params: int  # weights held in 4 bits
    quantized_bytes: int  # their packed codes + absmax statistics
    other_params: int  # every other parameter/buffer element (dense layers, norms, biases)
    other_bytes: int  # their bytes
    layers: int  # number of NF4Linear modules

    @property
    def bits_per_param(self) -> float:
        """Bits per quantized weight, statistics included (~4.5; ~4.127 with double quant)."""
        return 8.0 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    def __str__(self) -> str:
        return (f"{self.layers} NF4 layers: {self.quantized_params:,} weights in "
                f"{self.quantized_bytes / 2**20:.2f} MiB ({self.bits_per_param:.3f} bits/param); "
                f"other tensors {self.other_bytes / 2**20:.2f} MiB; "
                f"total {self.total_bytes / 2**20:.2f} MiB")


def memory_report(model: nn.Module) -> QuantReport:
    """Count quantized weights and bytes versus everything else held by the model."""
    qparams = qbytes = layers = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, NF4Linear) and id(module) not in seen:
            seen.add(id(module))
            layers += 1
            qparams += module.state.numel
            qbytes += module.nbytes()
    other = [t for m in model.modules() if not isinstance(m, NF4Linear)
             for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))]
    other += [m.bias for m in model.modules() if isinstance(m, NF4Linear) and m.bias is not None]
    unique = {t.data_ptr(): t for t in other if t.device.type != "meta"}  # tied weights once
    return QuantReport(quantized_params=qparams, quantized_bytes=qbytes,
                       other_params=sum(t.numel() for t in unique.values()),
                       other_bytes=sum(t.numel() * t.element_size() for t in unique.values()),
                       layers=layers)


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state dict (bitsandbytes 4-bit key layout) as one safetensors file.

    The write is atomic (temporary file + rename). Tied tensors are stored once per name.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.data_ptr()
        tensors[key] = tensor.clone() if ptr in seen else tensor  # safetensors refuses sharing
        seen.add(ptr)
    atomic_write(os.path.abspath(path),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "quantization": "bitsandbytes-4bit"}))


def load_quantized(model: nn.Module, path: str | os.PathLike,
                   compute_dtype: Optional[torch.dtype] = None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """Load a file written by ``save_quantized`` (or a bitsandbytes 4-bit state dict) into ``model``.

    Every ``nn.Linear`` whose weight is stored quantized becomes an ``NF4Linear``; all other
    tensors are loaded as they are. ``model`` may be on the meta device.

    Raises:
        KeyError: naming missing or unexpected keys.
    """
    sd = load_file(os.fspath(path), device=str(device))
    marker = ".weight.quant_state.bitsandbytes__"
    for key in [k for k in sd if marker in k]:
        name = key.split(marker)[0]
        parts = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight")}
        state = quant_state_from_tensors(parts, device)
        bias = sd.get(name + ".bias")
        packed = sd[name + ".weight"].view(torch.uint8)  # bitsandbytes may store other dtypes
        layer = NF4Linear(packed, state, bias, compute_dtype)
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer)
    result = model.load_state_dict(sd, strict=False, assign=True)
    _materialize_leftovers(model, device)
    missing = [k for k in result.missing_keys]
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()  # tied heads are stored under one name only if the file says so
        missing = [k for k in missing if any(p.is_meta for n, p in model.named_parameters()
                                             if n == k)]
    if missing or result.unexpected_keys:
        raise KeyError(f"load_quantized({os.fspath(path)!r}): missing keys {missing}, "
                       f"unexpected keys {list(result.unexpected_keys)}")
    refresh_save_guard(model)
    return model
