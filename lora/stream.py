"""Stream a safetensors checkpoint (one file or several shards) into a model built on meta.

``load_streamed`` never holds the dense model: every parameter is read from its file only when
its module is filled, cast to the base dtype, placed on the target device and, for the layers
chosen by an ``NF4Config``, quantized to NF4 right there, so the dense copy of that layer is
freed before the next one is read. Peak memory is then about the final model plus the largest
single tensor.

Tied weights (an output head sharing its embedding's ``Parameter``) are read once and shared
again afterwards, and checked: a tied head is the very tensor of its embedding. A tied linear
is never quantized (it would stop being shared). Parameters that no file holds (a new
classification head) and non-persistent buffers (rotary ``inv_freq``) get the model's own
initializer.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from typing import Optional, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .hf_save import refresh_save_guard
from .nf4_linear import NF4Linear

__all__ = ["NF4Config", "TensorFiles", "load_streamed", "nf4_layer"]

log = logging.getLogger(__name__)
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclasses.dataclass(frozen=True)
class NF4Config:
    """Which layers of a model become NF4, and how (QLoRA's defaults)."""
    skip: tuple = ("lm_head",)  # module names (exact or dotted suffix) left dense: heads
    blocksize: int = 64  # elements per absmax block (see lora.nf4.BLOCKSIZES)
    double_quant: bool = True  # store the absmax vector in 8 bits too (~4.127 bits/param)
    quant_type: str = "nf4"  # "nf4" or "fp4"
    compute_dtype: Optional[torch.dtype] = None  # matmul dtype; None: the input's dtype
    rounding: str = "auto"  # double-quant rounding: "auto" (by device), "cpu" or "cuda"

    def __post_init__(self) -> None:
        from .nf4 import BLOCKSIZES, QUANT_TYPES, ROUNDINGS
        object.__setattr__(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize}: expected one of {BLOCKSIZES}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r}: expected one of {QUANT_TYPES}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding={self.rounding!r}: expected one of {ROUNDINGS}")
        if self.compute_dtype is not None and not self.compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype={self.compute_dtype}: expected a float dtype or None")


class TensorFiles:
    """Single tensors of one or more safetensors files, read with plain file reads.

    Unlike a memory map, nothing of a file stays resident after a tensor is read, so the process
    holds only the tensors it keeps. A name found in two files is an error.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("no safetensors file given")
        self.entries: dict[str, tuple[str, int, dict]] = {}  # name -> (path, data start, entry)
        for path in map(os.fspath, paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint file {path} does not exist")
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                if name in self.entries:
                    raise ValueError(f"tensor {name!r} is in both {self.entries[name][0]} and {path}")
                if entry["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}; "
                                     f"expected one of {sorted(_ST_DTYPES)}")
                self.entries[name] = (path, 8 + size, entry)

    def keys(self) -> set[str]:
        return set(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2]["shape"])

    def get_tensor(self, name: str, dtype: Optional[torch.dtype] = None,
                   device: torch.device | str = "cpu",
                   expect: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        """The tensor ``name``; floats cast to ``dtype`` (None: as stored), then on ``device``.

        Raises:
            ValueError: its stored shape differs from ``expect`` (when given).
        """
        path, start, entry = self.entries[name]
        if expect is not None and tuple(entry["shape"]) != tuple(expect):
            raise ValueError(f"{path}: tensor {name!r} has shape {list(entry['shape'])}; the model "
                             f"expects {list(expect)}")
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
        if end > begin:
            with open(path, "rb") as f:
                f.seek(start + begin)
                f.readinto(out.view(-1).view(torch.uint8).numpy())  # straight into the tensor
        if dtype is not None and out.is_floating_point() and out.dtype != dtype:
            out = out.to(dtype)  # the stored copy is freed when this returns
        return out.to(device)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def nf4_layer(module: nn.Module, cfg: NF4Config, weight: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None) -> NF4Linear:
    """The ``NF4Linear`` of an ``nn.Linear`` or a transformers ``Conv1D`` (weight [in, out]).

    ``weight``/``bias`` replace the module's own tensors (e.g. read from a file while the module
    is on the meta device); a Conv1D's weight is transposed to [out, in] first.
    """
    weight = module.weight if weight is None else weight
    bias = module.bias if bias is None else bias
    if isinstance(module, Conv1D):
        weight = weight.t().contiguous()  # [in, out] -> [out, in]
    shell = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    shell.weight = nn.Parameter(weight.detach(), requires_grad=False)
    shell.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return NF4Linear.from_linear(shell, cfg.blocksize, cfg.double_quant, cfg.compute_dtype,
                                 cfg.quant_type, cfg.rounding)


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


def _file_key(key: str, files: TensorFiles, prefix: str) -> Optional[str]:
    """The file's name of model key ``key``: as is, without, or with the base-model prefix."""
    if key in files:
        return key
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in files:
        return key[len(prefix) + 1:]
    if prefix and prefix + "." + key in files:
        return prefix + "." + key
    return None


def _tie_groups(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it is reachable by (more than one name: tied)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {k: v for k, v in groups.items() if len(v) > 1}


def load_streamed(model: nn.Module, checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
                  dtype: Optional[torch.dtype] = None, quantize: Optional[NF4Config] = None,
                  device: torch.device | str = "cpu", new_modules: Sequence[str] = ()) -> nn.Module:
    """Fill a (meta-device) model from safetensors files, tensor by tensor, in place.

    Args:
        model: the architecture, typically built under ``torch.device("meta")``.
        checkpoint: one safetensors file or the list of a sharded checkpoint's files.
        dtype: dtype of every float tensor (None: as stored).
        quantize: None keeps every layer dense; an ``NF4Config`` turns each ``nn.Linear`` and
            transformers ``Conv1D`` (weight [in, out], transposed first) outside ``skip`` into an
            ``NF4Linear`` as soon as its weight is read.
        device: where every tensor is placed (and quantized).
        new_modules: names (exact or dotted suffix) of modules the checkpoint is expected to
            lack, e.g. a new classification head; others that it lacks are logged as warnings.
    Returns:
        The same model.
    Raises:
        ValueError: tied tensors stored with different values, or modules left on meta.
    """
    files = TensorFiles(checkpoint)
    prefix = getattr(model, "base_model_prefix", "") or ""
    ties = _tie_groups(model)
    tied_names = {n for names in ties.values() for n in names}
    loaded: dict[int, nn.Parameter] = {}  # id(meta parameter) -> its loaded replacement
    missing: list[str] = []
    for name, module in list(model.named_modules()):
        pre = name + "." if name else ""
        if quantize is not None and _quantizable(name, module, quantize, tied_names):
            w_key = _file_key(pre + "weight", files, prefix)
            if w_key is None:
                missing.append(pre + "weight")
                continue
            weight = files.get_tensor(w_key, dtype, device, module.weight.shape)
            b_key = _file_key(pre + "bias", files, prefix) if module.bias is not None else None
            bias = files.get_tensor(b_key, dtype, device, module.bias.shape) if b_key else None
            parent, attr = _parent(model, name)
            setattr(parent, attr, nf4_layer(module, quantize, weight=weight, bias=bias))
            del weight, bias  # the dense layer is gone before the next one is read
            continue
        for kind in ("_parameters", "_buffers"):
            for pname, value in list(getattr(module, kind).items()):
                if value is None or pname in getattr(module, "_non_persistent_buffers_set", ()):
                    continue
                if id(value) in loaded:  # tied: already read under another name
                    getattr(module, kind)[pname] = loaded[id(value)]
                    continue
                key = _file_key(pre + pname, files, prefix)
                if key is None and id(value) in ties:  # a tied tensor stored under another name
                    keys = (_file_key(n, files, prefix) for n in ties[id(value)])
                    key = next((k for k in keys if k is not None), None)
                if key is None:
                    missing.append(pre + pname)
                    continue
                tensor = files.get_tensor(key, dtype, device, value.shape)
                if kind == "_parameters":
                    tensor = nn.Parameter(tensor, requires_grad=value.requires_grad)
                    loaded[id(value)] = tensor
                getattr(module, kind)[pname] = tensor
    unexpected = [k for k in missing if not _matches(k.rpartition(".")[0], new_modules)]
    if unexpected:
        log.warning("not in the checkpoint, initialized by the model: %s", unexpected)
    elif missing:
        log.info("new modules initialized by the model: %s", missing)
    _materialize_leftovers(model, device)
    _check_ties(model, ties, files, prefix)
    refresh_save_guard(model)
    return model


def _quantizable(name: str, module: nn.Module, cfg: NF4Config, tied: set[str]) -> bool:
    """An ``nn.Linear`` / ``Conv1D`` outside ``cfg.skip``, not LoRA's own, not tied."""
    if type(module) not in (nn.Linear, Conv1D) or _matches(name, cfg.skip):
        return False
    if name.rpartition(".")[2] in ("lora_A", "lora_B"):  # LoRA's own trainable matrices
        return False
    return (name + ".weight" if name else "weight") not in tied


def _check_ties(model: nn.Module, ties: dict[int, list[str]], files: TensorFiles, prefix: str) -> None:
    """Every tied name is one tensor again; two stored copies of a tied tensor must agree."""
    for names in ties.values():
        first = model.get_parameter(names[0])
        for other in names[1:]:
            if model.get_parameter(other) is not first:
                raise ValueError(f"tied weights {names} were not re-tied after loading")
        stored = [k for k in (_file_key(n, files, prefix) for n in names) if k is not None]
        for key in stored[1:]:
            if not torch.equal(files.get_tensor(key, first.dtype, first.device), first.detach()):
                raise ValueError(f"the model ties {names}, but the checkpoint stores {stored[0]!r} "
                                 f"and {key!r} with different values")
