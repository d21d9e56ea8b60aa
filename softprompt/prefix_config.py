"""PrefixConfig: every knob of prefix tuning / P-Tuning v2, validated once at construction."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

PREFIX_INITS = ("random", "zero")


@dataclass(frozen=True)
class PrefixConfig:
    """Configuration of prefix tuning (learned per-layer key/value prefixes).

    The defaults reproduce peft 0.21.2's PREFIX_TUNING exactly; the one option peft lacks
    (``dropout``) is off by default and named as such.
    """

    # Number of virtual key/value positions each attention layer sees first (peft: num_virtual_tokens).
    n_virtual: int = 20
    # False: the prefixes are one trainable table [n_virtual, 2 * layers * kv_width]. True: a table
    # [n_virtual, kv_width] goes through Linear(kv_width, H)-Tanh-Linear(H, 2 * layers * kv_width)
    # (peft: prefix_projection).
    projection: bool = False
    # Width H of the projection MLP; None means kv_width (peft: encoder_hidden_size). Only with projection.
    encoder_hidden: Optional[int] = None
    # "random": N(0, 1) table and default nn.Linear inits; "zero": the table (no projection) or the
    # projection's last Linear starts at zero (peft: init_weights="zero"). Zero keys still take
    # attention mass, so "zero" is not a no-op.
    init: str = "random"
    # Dropout on the prefix keys/values in training, one mask per batch row (P-Tuning v2's reference
    # code has it; peft does not, so 0.0 matches peft).
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.n_virtual, bool) or not isinstance(self.n_virtual, int) or self.n_virtual <= 0:
            raise ValueError(f"n_virtual={self.n_virtual!r}; expected a positive int")
        if not isinstance(self.projection, bool):
            raise ValueError(f"projection={self.projection!r}; expected True or False")
        hidden = self.encoder_hidden
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
            raise ValueError(f"encoder_hidden={hidden!r}; expected None or a positive int")
        if hidden is not None and not self.projection:
            raise ValueError(f"encoder_hidden={hidden} is only used with projection=True (the MLP width); "
                             "got projection=False")
        if self.init not in PREFIX_INITS:
            raise ValueError(f"init={self.init!r}; expected one of {PREFIX_INITS}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}; expected a float in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrefixConfig":
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown PrefixConfig keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
