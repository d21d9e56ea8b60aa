"""Bottleneck adapters (Houlsby, Pfeiffer) as AdapterHub's ``adapters`` 1.3.0 defines them.

A bottleneck adapter acts on the output ``h`` (B, T, d) of a transformer sub-block (attention
after its output projection, or the feed-forward block) before the model adds the residual
stream ``x`` (B, T, d) and, in post-norm models like BERT, applies the layer norm ``LN``:

    model:   y = LN(h + x)                     (BERT)     y = h + x   (pre-norm decoders)
    adapter: h -> a(h, x),  a = f(z) + r,  f(z) = up(act(down(z))) * scaling

where ``z`` and ``r`` depend on the config (``original_ln_before``, ``residual_before_ln``, see
docs/bottleneck.md), and the model then computes ``LN(a + x)`` or ``a + x`` itself. The adapter
wraps the module that produces ``h`` (``BottleneckAdapter``); when ``z`` needs ``x`` as well, a
forward pre-hook on the module that receives ``x`` hands it over. No model forward is copied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn
from transformers.activations import get_activation


LOCATIONS = ("mh_adapter", "output_adapter")  # after attention / after the feed-forward block
INITS = ("bert", "mam_adapter", "houlsby")


def _num(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def activation(name: str) -> nn.Module:
    """The non-linearity AdapterHub uses for ``name`` (transformers' ``get_activation``, plus
    ``leakyrelu`` = ``F.leaky_relu`` with slope 0.01)."""
    if name.lower() == "leakyrelu":
        return nn.LeakyReLU()
    return get_activation(name.lower())


@dataclass(frozen=True)
class BottleneckConfig:
    """Hyper-parameters of a sequential bottleneck adapter; names and defaults are AdapterHub's
    (the defaults are its ``SeqBnConfig``, Pfeiffer et al. 2020; ``preset("houlsby")`` gives its
    ``DoubleSeqBnConfig``, Houlsby et al. 2019)."""

    # add an adapter after the attention block of each layer
    mh_adapter: bool = False
    # add an adapter after the feed-forward block of each layer
    output_adapter: bool = True
    # bottleneck size = int(hidden // reduction_factor) (at least 1); a mapping {"<layer>": f, "default": f}
    reduction_factor: Union[float, Mapping[str, float]] = 16
    # activation inside the bottleneck (transformers' ACT2FN names, e.g. relu, swish, gelu; or leakyrelu)
    non_linearity: str = "relu"
    # feed the adapter LN(h + x) (post-norm) or h + x (pre-norm) instead of h
    original_ln_before: bool = True
    # the model's own residual (and LN) after the adapter; must be True (see __post_init__)
    original_ln_after: bool = True
    # adapter residual r: True = h, False = the adapter input z, "post_add" = h + x (post-norm only)
    residual_before_ln: Union[bool, str] = True
    # add r before the adapter's own ln_after norm instead of after it
    adapter_residual_before_ln: bool = False
    # a new LayerNorm on the adapter input
    ln_before: bool = False
    # a new LayerNorm on the adapter output
    ln_after: bool = False
    # initialization: bert (N(0, 0.02)), mam_adapter (kaiming down, zero up), houlsby (trunc. N(0, 0.01))
    init_weights: str = "bert"
    # if set (and non-zero, as AdapterHub tests it), torch.manual_seed(seed) before each adapter's init
    init_weights_seed: Optional[int] = None
    # f is multiplied by this: a number, "learned" (one scalar) or "channel" (a [d] vector)
    scaling: Union[float, str] = 1.0
    # dropout on f (after scaling)
    dropout: float = 0.0
    # layer indices (from 0) that get no adapter
    leave_out: tuple = ()

    def __post_init__(self) -> None:
        for name in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after",
                     "adapter_residual_before_ln", "ln_before", "ln_after"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BottleneckConfig.{name}={getattr(self, name)!r}: expected a bool")
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("BottleneckConfig: mh_adapter and output_adapter are both False; expected at least one")
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            rf = {str(k): v for k, v in rf.items()}
            object.__setattr__(self, "reduction_factor", rf)
            values = list(rf.values())
        else:
            values = [rf]
        if not values or not all(_num(v) and v > 0 for v in values):
            raise ValueError(f"BottleneckConfig.reduction_factor={self.reduction_factor!r}: expected a number > 0 "
                             f"or a mapping of layer index (str) / 'default' to numbers > 0")
        if not isinstance(self.non_linearity, str):
            raise ValueError(f"BottleneckConfig.non_linearity={self.non_linearity!r}: expected a str")
        try:
            activation(self.non_linearity)
        except KeyError:
            raise ValueError(f"BottleneckConfig.non_linearity={self.non_linearity!r}: not an activation name "
                             f"transformers knows (e.g. relu, swish, gelu, tanh, leakyrelu)") from None
        if not self.original_ln_after:
            raise ValueError("BottleneckConfig.original_ln_after=False is not supported: the model's own residual "
                             "(and layer norm) always follows the adapter (AdapterHub's hooked models refuse it too)")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"BottleneckConfig.residual_before_ln={self.residual_before_ln!r}: "
                             f"expected True, False or 'post_add'")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError("BottleneckConfig.residual_before_ln='post_add' needs original_ln_before=True")
        if self.init_weights not in INITS:
            raise ValueError(f"BottleneckConfig.init_weights={self.init_weights!r}: expected one of {INITS}")
        if self.init_weights_seed is not None and (isinstance(self.init_weights_seed, bool)
                                                   or not isinstance(self.init_weights_seed, int)):
            raise ValueError(f"BottleneckConfig.init_weights_seed={self.init_weights_seed!r}: expected None or an int")
        if not (_num(self.scaling) or self.scaling in ("learned", "channel")):
            raise ValueError(f"BottleneckConfig.scaling={self.scaling!r}: expected a number, 'learned' or 'channel'")
        if not _num(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BottleneckConfig.dropout={self.dropout!r}: expected a float in [0, 1)")
        leave = self.leave_out
        if isinstance(leave, (str, bytes)) or not isinstance(leave, (list, tuple, set, frozenset)) \
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in leave):
            raise ValueError(f"BottleneckConfig.leave_out={leave!r}: expected a list of layer indices >= 0")
        object.__setattr__(self, "leave_out", tuple(sorted(set(leave))))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "BottleneckConfig":
        """``"pfeiffer"`` (AdapterHub's ``seq_bn``) or ``"houlsby"`` (``double_seq_bn``), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"bottleneck preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def bottleneck_size(self, hidden: int, layer: int) -> int:
        """The bottleneck width at ``layer``: ``int(hidden // reduction_factor)``, at least 1."""
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            if str(layer) in rf:
                rf = rf[str(layer)]
            elif "default" in rf:
                rf = rf["default"]
            else:
                raise ValueError(f"BottleneckConfig.reduction_factor={rf!r} has no entry for layer {layer} "
                                 f"and no 'default'")
        return max(1, int(hidden // rf))


# AdapterHub 1.3.0's SeqBnConfig and DoubleSeqBnConfig (their other fields equal the defaults)
PRESETS: dict[str, dict[str, Any]] = {
    "pfeiffer": dict(mh_adapter=False, output_adapter=True, original_ln_before=True, non_linearity="relu",
                     reduction_factor=16),
    "houlsby": dict(mh_adapter=True, output_adapter=True, original_ln_before=False, non_linearity="swish",
                    reduction_factor=16),
}


class BottleneckAdapter(nn.Module):
    """Wraps the module producing a sub-block output ``h`` (B, T, d) and returns ``a(h, x)``.

    Args:
        base_layer: the frozen module whose output is ``h`` (kept as ``base_layer``).
        hidden: d, the model's hidden size.
        size: the bottleneck width m; ``adapter_down`` is Linear(d, m), ``adapter_up`` Linear(m, d).
        config: the adapter's config.
        layer_norm: the model's post-norm applied to ``h + x`` (BERT), or None (pre-norm models).
            Held by reference, not registered: it stays the model's own (frozen) module.
    """

    def __init__(self, base_layer: nn.Module, hidden: int, size: int, config: BottleneckConfig,
                 layer_norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self._layer_norm = (layer_norm,)  # a tuple: not a submodule
        self._residual: Optional[torch.Tensor] = None  # x, set by the pre-hook right before forward
        # construction order is AdapterHub's (norm, down, up, scaling, norm after): the same draws
        self.adapter_norm_before = nn.LayerNorm(hidden) if config.ln_before else None
        self.adapter_down = nn.Linear(hidden, size)
        self.act = activation(config.non_linearity)
        self.adapter_up = nn.Linear(size, hidden)
        if config.scaling == "learned":
            self.scaling: Union[float, nn.Parameter] = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden))
        else:
            self.scaling = float(config.scaling)
        self.adapter_norm_after = nn.LayerNorm(hidden) if config.ln_after else None
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """AdapterHub's ``init_weights`` schemes (norms start at weight 1, bias 0)."""
        if self.config.init_weights_seed:
            torch.manual_seed(self.config.init_weights_seed)
        down, up = self.adapter_down, self.adapter_up
        if self.config.init_weights == "bert":
            down.weight.normal_(0.0, 0.02)
            up.weight.normal_(0.0, 0.02)
            up.bias.zero_()
        elif self.config.init_weights == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            up.weight.zero_()
            up.bias.zero_()
        else:  # houlsby
            nn.init.trunc_normal_(down.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.trunc_normal_(up.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            up.bias.zero_()
        down.bias.zero_()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by local name, e.g. ``adapter_down.weight`` [m, d]."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    def _branch(self, z: torch.Tensor) -> torch.Tensor:
        """f(z) = dropout(up(act(down(norm_before(z)))) * scaling), in the adapter's dtype."""
        z = z.to(self.adapter_down.weight.dtype)
        if self.adapter_norm_before is not None:
            z = self.adapter_norm_before(z)
        up = self.adapter_up(self.act(self.adapter_down(z)))  # (B, T, m) -> (B, T, d)
        return self.dropout(up * self.scaling)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(*args, **kwargs)  # (B, T, d)
        x, self._residual = self._residual, None
        cfg, ln = self.config, self._layer_norm[0]
        if cfg.original_ln_before:
            if x is None:
                raise RuntimeError(f"{type(self).__name__}: the residual stream was not captured before the "
                                   f"wrapped {type(self.base_layer).__name__} ran (was the model's hook removed?)")
            s = h + x  # what the model would normalize / pass on
            z = ln(s) if ln is not None else s
            r = h if cfg.residual_before_ln is True else s if cfg.residual_before_ln == "post_add" else z
        else:
            z = r = h
        out = self._branch(z).to(h.dtype)
        if cfg.adapter_residual_before_ln:
            out = out + r
        if self.adapter_norm_after is not None:
            out = self.adapter_norm_after(out.to(self.adapter_down.weight.dtype)).to(h.dtype)
        if not cfg.adapter_residual_before_ln:
            out = out + r
        return out  # the model then computes LN(out + x) or out + x

    def extra_repr(self) -> str:
        return (f"d={self.adapter_down.in_features}, m={self.adapter_down.out_features}, "
                f"act={self.config.non_linearity}, original_ln_before={self.config.original_ln_before}")
