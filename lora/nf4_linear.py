"""NF4Linear: a frozen linear layer whose weight is stored as packed 4-bit codes.

Forward dequantizes the weight to the compute dtype and runs ``F.linear``. The autograd
function saves only references to the packed bytes and the quantization state; backward
dequantizes again, so no dense [out, in] weight stays alive between forward and backward.

The state dict uses bitsandbytes' ``Linear4bit`` key layout (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``), so a saved quantized model reads like a
bitsandbytes one.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nf4_backends import check_backend, dequantize_with
from .nf4 import (NF4State, check_packed, codebook, dequantize_nf4, dynamic_map_8bit, quantize_nf4,
                  warm_tables)

_QS_KEY = "weight.quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# CPU: one reusable dequantization buffer per (elements, dtype). A fresh [out, in] weight per
# call, freed right after its matmul, is what glibc's heap keeps (its mmap threshold rises to
# the size of the first freed weight, later ones land between live activations and are never
# given back): ~190 MiB of SmolLM2's QLoRA training peak. The buffer never outlives the matmul
# (nothing saves it: autograd is off inside forward, and backward reuses it only without
# create_graph).
_SCRATCH: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _weight_for_matmul(layer: "NF4Linear", dtype: torch.dtype) -> torch.Tensor:
    if (layer.backend != "torch" or layer.weight.device.type != "cpu" or torch.is_grad_enabled()
            or torch.compiler.is_compiling()):
        return layer.dequantize(dtype)
    key = (layer.out_features * layer.in_features, dtype)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = _SCRATCH[key] = torch.empty(key[0], dtype=dtype)
    return dequantize_nf4(layer.weight, layer.state, dtype, out=buf)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W).T + b, with backward re-dequantizing W (no weight gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "NF4Linear",
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.layer = layer  # the packed weight is part of the module: nothing dense is kept
        ctx.has_bias = bias is not None
        return F.linear(x, _weight_for_matmul(layer, x.dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, Optional[torch.Tensor]]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _weight_for_matmul(ctx.layer, grad.dtype)  # (..., out) @ [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class NF4Linear(nn.Module):
    """A linear layer with a frozen NF4 (or FP4) weight and a float bias.

    The packed codes are the frozen uint8 parameter ``weight`` (so FSDP2 can shard them); the
    statistics (``state``) stay a plain attribute replicated on every process.

    Args:
        packed: uint8 [(out * in + 1) // 2, 1] codes from ``quantize_nf4`` (any shape of exactly
            those bytes); this constructor is the way to build a layer from stored tensors.
        state: its ``NF4State`` (``state.shape`` must be [out, in]).
        bias: optional float [out]; kept frozen.
        compute_dtype: dtype of the matmul; None uses the input's dtype.
        backend: how the weight is dequantized: "torch" (default, pure PyTorch), "bnb"
            (bitsandbytes' kernels) or "compile" (torch.compile'd); see ``lora.nf4_backends``.
    """

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None, backend: str = "torch") -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self._backend_cache: dict = {}
        if len(state.shape) != 2:
            raise ValueError(f"state.shape={tuple(state.shape)}: expected a 2-D [out, in] weight")
        check_packed(packed, state)
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        # a frozen uint8 Parameter, not a buffer: FSDP2 shards parameters (as FSDP-QLoRA does)
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        self.state = state  # tensors move with the module (see _apply), never change dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype
        warm_tables(state.quant_type, self.weight.device)  # torch.compile then reads them cached

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, quant_type: str = "nf4",
                    rounding: str = "auto", backend: str = "torch") -> "NF4Linear":
        """Quantize an ``nn.Linear`` (weight [out, in]); see ``quantize_nf4`` for the arguments."""
        packed, state = quantize_nf4(linear.weight, blocksize, double_quant, quant_type, rounding)
        return cls(packed, state, linear.bias, compute_dtype, backend)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense [out, in] tensor in ``dtype`` (by ``self.backend``)."""
        if self.backend == "torch":
            return dequantize_nf4(self.weight, self.state, dtype)
        return dequantize_with(self.backend, self.weight, self.state, dtype, self._backend_cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out) in x's dtype, computed in ``compute_dtype``."""
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _NF4Matmul.apply(x.to(dtype), self, bias).to(x.dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (and the bias) in ``dtype``."""
        device = self.weight.device
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(device=device, dtype=dtype),
                                       requires_grad=False)
        return linear

    def nbytes(self) -> int:
        """Bytes of the quantized weight: packed codes plus statistics (bias excluded)."""
        return self.weight.numel() + self.state.nbytes()

    # ------------------------------------------------------------------------- device moves
    def _apply(self, fn: Any, recurse: bool = True) -> "NF4Linear":
        super()._apply(fn, recurse)
        # learn the target device from a probe; dtype casts (model.half()) never touch the state
        device = fn(torch.empty(0, device=self.weight.device)).device
        self.state = self.state.to(device)
        warm_tables(self.state.quant_type, device)
        return self

    # ------------------------------------------------------------------ bitsandbytes key layout
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, tensor in quant_state_tensors(self.state).items():
            destination[prefix + key] = tensor

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
        qs_keys = [k for k in state_dict if k.startswith(prefix + _QS_KEY)]
        if qs_keys:
            extra = {k[len(prefix):]: state_dict[k] for k in state_dict
                     if k.startswith(prefix + "weight.")}
            self.state = quant_state_from_tensors(extra, self.weight.device)
            packed = state_dict[prefix + "weight"].view(torch.uint8).reshape(-1, 1)
            packed = packed.to(self.weight.device)
            check_packed(packed, self.state)
            self.weight = nn.Parameter(packed, requires_grad=False)
            self.out_features, self.in_features = (int(d) for d in self.state.shape)
        elif prefix + "weight" in state_dict:
            error_msgs.append(f"{prefix}weight: no {_QS_KEY}* entry; not an NF4 checkpoint")
        remaining = {k: v for k, v in state_dict.items()
                     if not k.startswith(prefix + "weight")}
        super()._load_from_state_dict(remaining, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "weight" in missing_keys and qs_keys:
            missing_keys.remove(prefix + "weight")

    def extra_repr(self) -> str:
        s = self.state
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={s.quant_type}, blocksize={s.blocksize}, "
                f"double_quant={s.double_quant}, compute_dtype={self.compute_dtype}")


def quant_state_tensors(state: NF4State) -> dict[str, torch.Tensor]:
    """The state as bitsandbytes' ``QuantState.as_dict(packed=True)`` tensors (keys after ``p.``)."""
    meta = {"quant_type": state.quant_type, "blocksize": state.blocksize,
            "dtype": str(state.dtype).replace("torch.", ""), "shape": list(state.shape)}
    out = {"weight.absmax": state.absmax,
           "weight.quant_map": codebook(state.quant_type, state.absmax.device)}  # fresh tensor
    if state.double_quant:
        meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=state.offset.item())
        out["weight.nested_absmax"] = state.nested_absmax
        out["weight.nested_quant_map"] = dynamic_map_8bit().clone().to(state.absmax.device)
    blob = torch.frombuffer(bytearray(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    out[_QS_KEY + state.quant_type] = blob.to(state.absmax.device)
    return out


def quant_state_from_tensors(tensors: dict[str, torch.Tensor],
                             device: torch.device | str = "cpu") -> NF4State:
    """Inverse of ``quant_state_tensors`` (keys ``weight.absmax``, ... ``weight.quant_state.*``)."""
    blobs = [k for k in tensors if k.startswith(_QS_KEY)]
    if len(blobs) != 1:
        raise ValueError(f"expected one {_QS_KEY}<type> entry, found {blobs}")
    meta = json.loads(bytes(tensors[blobs[0]].cpu().tolist()).decode("utf-8"))
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"dtype={meta['dtype']!r}: expected one of {sorted(_DTYPES)}")
    nested = "weight.nested_absmax" in tensors
    return NF4State(
        absmax=tensors["weight.absmax"].to(device), shape=torch.Size(meta["shape"]),
        dtype=_DTYPES[meta["dtype"]], blocksize=int(meta["blocksize"]),
        quant_type=meta["quant_type"],
        offset=torch.tensor(meta["nested_offset"], dtype=torch.float32, device=device)
        if nested else None,
        nested_absmax=tensors["weight.nested_absmax"].to(device)
        if nested else None)
