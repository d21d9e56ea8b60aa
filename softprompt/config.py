"""PromptConfig: every knob of a soft prompt, validated once at construction."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

METHODS = ("prompt", "ptuning")
INITS = ("random", "text", "vocab", "ids")
ENCODERS = ("mlp", "lstm", "lstm_uni")
POOLS = ("backbone", "real_cls")


@dataclass(frozen=True)
class PromptConfig:
    """Configuration of Prompt Tuning (``method="prompt"``) or P-Tuning (``method="ptuning"``).

    The defaults reproduce peft 0.21.2 exactly; every option that departs from peft is named as
    such in its comment and in docs/softprompt.md.
    """

    # "prompt": a trainable [n_virtual, d] table; "ptuning": a table reparameterized by an encoder.
    method: str = "prompt"
    # Number of virtual tokens prepended to every sequence (peft: num_virtual_tokens).
    n_virtual: int = 20
    # Table init: "random" N(0,1); "text" embeddings of the tokenized init_text; "vocab" rows of
    # randomly drawn vocabulary ids; "ids" embeddings of init_ids. peft offers only "random" for
    # P-Tuning; the other inits on P-Tuning initialise the encoder input (an ablation option).
    init: str = "random"
    # Text for init="text"; tokenized with the tokenizer's special tokens (as peft does).
    init_text: Optional[str] = None
    # Consent to cut an init text that tokenizes to more than n_virtual ids (peft cuts silently).
    truncate_init_text: bool = False
    # Token ids for init="ids"; repeated or (with truncate_init_text) cut to n_virtual.
    init_ids: Optional[tuple[int, ...]] = None
    # P-Tuning encoder: "mlp" and "lstm" are peft's; "lstm_uni" is a unidirectional LSTM(d -> d)
    # whose output is the prompt directly (no MLP head; not in peft).
    encoder: str = "mlp"
    # Encoder width H; None means the embedding width d (peft: encoder_hidden_size).
    encoder_hidden: Optional[int] = None
    # LSTM layers (peft honours it for LSTM only). peft's MLP always has 2 hidden layers.
    encoder_num_layers: int = 2
    # LSTM inter-layer dropout (peft honours it for LSTM only).
    encoder_dropout: float = 0.0
    # True builds an MLP with encoder_num_layers hidden layers and dropout after each ReLU (not
    # peft). False (the default) refuses MLP values that peft would silently ignore.
    honour_mlp_options: bool = False
    # Classification pooling: "backbone" runs the backbone's own head on [prompt; input] (peft:
    # BERT pools the first virtual token); "real_cls" puts the prompt after the first real token
    # so the head pools the real [CLS] (not peft).
    pool: str = "backbone"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; expected one of {METHODS}")
        for name in ("truncate_init_text", "honour_mlp_options"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; expected a bool")
        if isinstance(self.n_virtual, bool) or not isinstance(self.n_virtual, int) or self.n_virtual <= 0:
            raise ValueError(f"n_virtual={self.n_virtual!r}; expected a positive int")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}; expected one of {INITS}")
        if self.init == "text" and not self.init_text:
            raise ValueError(f"init='text' needs a non-empty init_text, got {self.init_text!r}")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"init_text={self.init_text!r} is only used with init='text', "
                             f"got init={self.init!r}")
        if self.init == "ids":
            if not self.init_ids or any(not isinstance(i, int) or i < 0 for i in self.init_ids):
                raise ValueError(f"init='ids' needs a non-empty tuple of ids >= 0, "
                                 f"got {self.init_ids!r}")
            object.__setattr__(self, "init_ids", tuple(self.init_ids))
        elif self.init_ids is not None:
            raise ValueError(f"init_ids={self.init_ids!r} is only used with init='ids', got init={self.init!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder={self.encoder!r}; expected one of {ENCODERS}")
        hidden = self.encoder_hidden
        if hidden is not None and (not isinstance(hidden, int) or hidden <= 0):
            raise ValueError(f"encoder_hidden={self.encoder_hidden!r}; expected None or a positive int")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers={self.encoder_num_layers!r}; expected an int >= 1")
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) \
                or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout={self.encoder_dropout!r}; expected a float in [0, 1)")
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r}; expected one of {POOLS}")
        self._check_encoder_options()

    def _check_encoder_options(self) -> None:
        """Refuse options that would be silently ignored."""
        if self.method == "prompt":
            changed = {f: getattr(self, f) for f in ("encoder_hidden", "honour_mlp_options")
                       if getattr(self, f) != _DEFAULTS[f]}
            if self.encoder != "mlp" or self.encoder_num_layers != 2 or self.encoder_dropout != 0.0 or changed:
                raise ValueError("encoder options are only used with method='ptuning'; got method='prompt' "
                                 f"with encoder={self.encoder!r}, encoder_num_layers={self.encoder_num_layers}, "
                                 f"encoder_dropout={self.encoder_dropout}, {changed}")
            return
        if self.encoder == "mlp" and not self.honour_mlp_options and (
                self.encoder_num_layers != 2 or self.encoder_dropout != 0.0):
            raise ValueError(
                f"encoder='mlp' with encoder_num_layers={self.encoder_num_layers}, encoder_dropout="
                f"{self.encoder_dropout}: peft's MLP always has 2 hidden layers and no dropout and would "
                "ignore these; set honour_mlp_options=True to build that MLP, or keep 2 and 0.0")
        if self.encoder != "mlp" and self.honour_mlp_options:
            raise ValueError(f"honour_mlp_options=True only applies to encoder='mlp', got {self.encoder!r}")
        if self.encoder == "lstm_uni" and self.encoder_hidden is not None:
            raise ValueError(f"encoder='lstm_uni' maps d -> d directly; encoder_hidden must be None, "
                             f"got {self.encoder_hidden}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        if out["init_ids"] is not None:
            out["init_ids"] = list(out["init_ids"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PromptConfig":
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown PromptConfig keys {unknown}; expected a subset of {sorted(names)}")
        data = dict(data)
        if data.get("init_ids") is not None:
            data["init_ids"] = tuple(data["init_ids"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PromptConfig)}
