"""Quantize a whole model to NF4 in place, undo it, report its size, save and load it.

``quantize_model`` swaps every ``nn.Linear`` (except the output head and LoRA's own A/B
matrices) for an ``NF4Linear``, one layer at a time, dropping each dense weight as soon as its
4-bit copy exists. Given ``checkpoint=`` (a safetensors file) the model may live on the meta
device: each tensor is then read from the file only when its layer is quantized, so peak memory
stays near the quantized size plus one dense layer.

``dequantize_model`` turns every ``NF4Linear`` (including a LoRALinear's base) back into an
``nn.Linear`` in a 16/32-bit dtype, the step before merging adapters; calling
``quantize_model`` again afterwards is the explicit re-quantize step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write
from .nf4_linear import NF4Linear, quant_state_from_tensors

_ADAPTER_CHILDREN = ("lora_A", "lora_B")  # LoRA's trainable linears are never quantized
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _TensorFile:
    """Reads single tensors of a safetensors file with plain file reads.

    Unlike a memory map, nothing of the file stays resident after a tensor is read, so the
    process holds only the tensors it keeps.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str) -> None:
        self.path, self.device = os.fspath(path), device
        with open(self.path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries = header  # name -> {"dtype", "shape", "data_offsets": [begin, end]}

    def keys(self) -> set[str]:
        return set(self.entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype = _ST_DTYPES[entry["dtype"]]
        out = torch.empty(entry["shape"], dtype=dtype)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self.start + begin)
                f.readinto(out.view(-1).view(torch.uint8).numpy())  # straight into the tensor
        return out.to(self.device)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def quantize_model(model: nn.Module, skip: Sequence[str] = ("lm_head",), blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None,
                   quant_type: str = "nf4", rounding: str = "auto",
                   checkpoint: Optional[str | os.PathLike] = None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by ``NF4Linear``, in place, layer by layer.

    Args:
        model: any module; with ``checkpoint`` it may be on the meta device.
        skip: module names (exact or dotted suffix) left dense, e.g. the output head.
        blocksize, double_quant, quant_type, rounding: see ``lora.nf4.quantize_nf4``.
        compute_dtype: matmul dtype of the quantized layers (None: the input's dtype).
        checkpoint: optional safetensors file with the dense weights (``model.state_dict()``
            names); every tensor of the model is read from it.
        device: where tensors read from ``checkpoint`` are placed.
    Returns:
        The same model object.
    """
    reader = _TensorFile(checkpoint, device) if checkpoint else None
    done: dict[int, NF4Linear] = {}  # id(linear) -> its replacement (shared modules stay shared)
    # names only: a list of modules would keep every dense weight alive until the end
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip)]
    for name in names:
        parent, attr = _parent(model, name)
        module = getattr(parent, attr)
        if attr in _ADAPTER_CHILDREN and hasattr(parent, "base_layer"):
            continue
        if id(module) not in done:
            if reader is not None:
                _load_params(module, name, reader)
            done[id(module)] = NF4Linear.from_linear(module, blocksize, double_quant,
                                                     compute_dtype, quant_type, rounding)
        setattr(parent, attr, done[id(module)])  # the dense weight is freed here
        del module
    if reader is not None:  # everything that stayed dense
        for name, module in model.named_modules():
            if not isinstance(module, NF4Linear):
                _load_params(module, name, reader)
        _materialize_leftovers(model, device)
    return model


def _materialize_leftovers(model: nn.Module, device: torch.device | str) -> None:
    """Give meta-device modules that no file holds (e.g. rotary ``inv_freq``, a non-persistent
    buffer) real storage, filled by the model's own initializer.

    Raises:
        ValueError: naming modules left partly on the meta device.
    """
    init = getattr(model, "_init_weights", None)
    left = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not any(t.is_meta for t in own):
            continue
        if init is not None and all(t.is_meta for t in own):  # nothing of it was loaded
            module.to_empty(device=device, recurse=False)
            init(module)
        else:
            left.append(name)
    if left:
        raise ValueError(f"modules still (partly) on the meta device after loading: {left}")


def _load_params(module: nn.Module, name: str, reader: _TensorFile) -> None:
    """Materialize the module's own parameters and buffers from a safetensors reader."""
    keys = set(reader.keys())
    prefix = name + "." if name else ""
    for kind in ("_parameters", "_buffers"):
        for pname, value in list(getattr(module, kind).items()):
            key = prefix + pname
            if value is None or key not in keys:
                continue
            tensor = reader.get_tensor(key)
            if kind == "_parameters":
                tensor = nn.Parameter(tensor, requires_grad=value.requires_grad)
            getattr(module, kind)[pname] = tensor


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
    return model
