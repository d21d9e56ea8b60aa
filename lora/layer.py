"""LoRALinear: a frozen linear-like base plus a trainable low-rank update (LoRA, rsLoRA, DoRA).

    y = base(x) + B(A(dropout(x))) * scaling            A: [r, in], B: [out, r]
    scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

DoRA (weight-decomposed LoRA) adds a trainable magnitude m: [out] and computes, with the row norm
n = ||W + scaling * B @ A||_row treated as a constant (detached):

    y = base(x) + (m / n - 1) * (x @ W^T) + (m / n) * B(A(x)) * scaling
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import AdapterLayer


# base types whose forward returns a newly allocated tensor that nothing saves for backward
# (not NF4Linear: its output is a view made inside an autograd.Function, which autograd
# forbids modifying in place)
_FRESH_OUTPUT_TYPES = (nn.Linear, Conv1D)


def _features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if isinstance(base, Conv1D):  # weight is stored [in, out]
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if not isinstance(in_f, int) or not isinstance(out_f, int):
        raise TypeError(f"LoRALinear needs a linear-like base with int in_features/out_features, "
                        f"got {type(base).__name__}")
    return in_f, out_f


def _is_quantized(base: nn.Module) -> bool:
    """A base with ``dequantize``, or whose weight is not floating point (packed codes)."""
    weight = getattr(base, "weight", None)
    packed = isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point
    return callable(getattr(base, "dequantize", None)) or packed


def _adapter_place(base: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    """Device of the base and the float dtype adapters are first rounded to (None: keep fp32)."""
    tensors = list(base.parameters(recurse=False)) + list(base.buffers(recurse=False))
    device = tensors[0].device if tensors else None
    if _is_quantized(base):
        dtype = getattr(base, "compute_dtype", None)
    else:
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else None
    if dtype is not None and not dtype.is_floating_point:
        dtype = None
    return device, dtype


class LoRALinear(AdapterLayer):
    """A frozen linear-like ``base_layer`` plus ``lora_A``/``lora_B`` (and DoRA's magnitude).

    Args:
        base: ``nn.Linear``, transformers ``Conv1D`` (weight [in, out]) or any module with
            ``in_features``, ``out_features`` and forward; a quantized base also has
            ``dequantize(dtype=torch.float32) -> Tensor[out, in]``.
        r: rank (> 0).
        alpha: scaling numerator.
        dropout: dropout probability on the LoRA branch input.
        use_rslora: scaling = alpha / sqrt(r) instead of alpha / r.
        use_dora: add DoRA's trainable magnitude vector ``lora_magnitude_vector`` [out].

    Init (same draws, same order, as peft on the default generator): an ``nn.Linear(in, r)`` for A
    and an ``nn.Linear(r, out)`` for B are built with their default init, then A is re-drawn with
    ``kaiming_uniform_(a=sqrt(5))`` and B is zeroed, so the wrapper starts equal to the base.
    Adapters live in fp32; on a 16-bit base their initial values are rounded to that dtype first.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRALinear r={r!r}: expected a positive int")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear dropout={dropout!r}: expected a float in [0, 1)")
        in_f, out_f = _features(base)
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, r, bias=False)   # weight [r, in]; draw 1
        self.lora_B = nn.Linear(r, out_f, bias=False)  # weight [out, r]; draw 2
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # draw 3: U(+-1/sqrt(in))
        nn.init.zeros_(self.lora_B.weight)
        device, low = _adapter_place(base)
        self.lora_A.to(device=device, dtype=low)
        self.lora_B.to(device=device, dtype=low)
        if use_dora:
            # m = ||W + s B A||_row, computed in the rounding dtype like the reference
            dt = low or torch.float32
            w = self.base_weight(dt)
            m = torch.linalg.norm(w + self.scaling * (self.lora_B.weight.to(dt) @ self.lora_A.weight.to(dt)),
                                  dim=1).to(dt)
            self.lora_magnitude_vector = nn.Parameter(m.detach().float())  # (out,)
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self.lora_A.float()
        self.lora_B.float()
        self.merged = False
        self._merge_norm: Optional[torch.Tensor] = None  # DoRA's row norm at merge time, for unmerge

    # ----------------------------------------------------------------------------------------- views
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (some model code reads ``proj.weight``)."""
        return self.base_layer.weight

    @property
    def quantized(self) -> bool:
        """Whether the current base is quantized (derived, so swapping ``base_layer`` needs no bookkeeping)."""
        return _is_quantized(self.base_layer)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r], DoRA's ``lora_magnitude_vector`` [out]."""
        out = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.lora_magnitude_vector is not None:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector
        return out

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight as [out, in] in ``dtype`` (dequantized for a quantized base)."""
        if self.quantized:
            if not callable(getattr(self.base_layer, "dequantize", None)):
                raise TypeError(f"{type(self.base_layer).__name__} holds a packed weight but has no "
                                f"dequantize(dtype) method, which DoRA and merging need")
            return self.base_layer.dequantize(dtype=torch.float32).to(dtype)
        w = self.base_layer.weight
        return (w.t() if self.fan_in_fan_out else w).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A as fp32 [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., in) -> (..., out) in the base output dtype."""
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)  # (..., in)
        if self.use_dora:
            result = result + self._dora_extra(x, result)
        else:
            lora = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # (..., out)
            if self.quantized and not torch.is_autocast_enabled(x.device.type):
                # QLoRA rule: round the LoRA output to the base output dtype before the add
                lora = lora.to(out_dtype)
            if lora.dtype == result.dtype and self._owns_base_output():
                # same dtype: the in-place sum rounds exactly like `result + lora` and saves one
                # (..., out) allocation; autograd never saves the base output
                result = result.add_(lora)
            else:
                result = result + lora  # summed in the promoted dtype, rounded once below
        return result.to(out_dtype)

    def _owns_base_output(self) -> bool:
        """Whether the base output is a fresh tensor nobody else holds: a known base type (its
        forward allocates its output) and no forward hook that could keep a reference to it."""
        return type(self.base_layer) in _FRESH_OUTPUT_TYPES and not self.base_layer._forward_hooks

    def _dora_extra(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """(m/n - 1) * x W^T + (m/n) * s * B(A(x)); x: (..., in), result: base(x) (..., out)."""
        w = self.base_weight(x.dtype)                                       # [out, in]
        # B @ A as B(A^T)^T: the same matmul (A^T [in, r] through lora_B) the reference runs
        lora_w = self.lora_B(self.lora_A.weight.t().contiguous()).t().detach().to(x.dtype)  # [out, in]
        norm = torch.linalg.norm(w + self.scaling * lora_w, dim=1).to(w.dtype).detach()  # (out,)
        scale = (self.lora_magnitude_vector / norm).view(1, -1)            # (1, out)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            x = self.lora_dropout(x)
            base = F.linear(x, w)  # recomputed on the dropped input, without bias
        else:
            bias = getattr(self.base_layer, "bias", None)
            base = result if bias is None else result - bias  # x W^T: the bias is not rescaled
        lora = self.lora_B(self.lora_A(x))
        return (scale - 1) * base + scale * lora * self.scaling

    # ----------------------------------------------------------------------------------------- merge
    def _check_mergeable(self) -> None:
        if self.quantized:
            raise RuntimeError(
                f"cannot merge LoRA into a quantized {type(self.base_layer).__name__}: re-quantizing "
                f"W + delta is lossy. Call lora.dequantize_model(model, dtype=...) first and merge into "
                f"the 16/32-bit weights.")

    @torch.no_grad()
    def _set_base_weight(self, w: torch.Tensor) -> None:
        """Write an [out, in] weight into the base, in place, in the base dtype."""
        target = self.base_layer.weight
        target.copy_((w.t() if self.fan_in_fan_out else w).to(target.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta (DoRA: W <- (m/n) (W + delta)), computed in fp32. Idempotent."""
        if self.merged:
            return
        self._check_mergeable()
        w = self.base_weight(torch.float32) + self.delta_weight()  # [out, in]
        if self.use_dora:
            self._merge_norm = torch.linalg.norm(w, dim=1)         # (out,)
            w = (self.lora_magnitude_vector.float() / self._merge_norm).view(-1, 1) * w
        self._set_base_weight(w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to fp32 rounding). Idempotent."""
        if not self.merged:
            return
        w = self.base_weight(torch.float32)
        if self.use_dora:
            w = w / (self.lora_magnitude_vector.float() / self._merge_norm).view(-1, 1)
            self._merge_norm = None
        self._set_base_weight(w - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.6g}, dora={self.use_dora}, "
                f"merged={self.merged}")
