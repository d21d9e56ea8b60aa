"""PromptEncoder: P-Tuning's reparameterization of the virtual-token table (mlp | lstm)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from softprompt.prompt import SoftPrompt


class PromptEncoder(nn.Module):
    """prompt = head(table), table a trainable [n_virtual, d] ``SoftPrompt``.

    kinds (H = hidden, default d):
      - ``"mlp"`` (peft): Linear(d,H)-ReLU-Linear(H,H)-ReLU-Linear(H,d). With ``mlp_layers`` = k
        (not peft) it is Linear(d,H)-ReLU-[Dropout] followed by (k-1) x Linear(H,H)-ReLU-[Dropout],
        then Linear(H,d); k = 2 and dropout 0 give peft's layer list exactly.
      - ``"lstm"`` (peft): bidirectional LSTM(d->H, num_layers, dropout), then
        Linear(2H,2H)-ReLU-Linear(2H,d).
      - ``"lstm_uni"`` (not peft): unidirectional LSTM(d->d, num_layers, dropout); its output is
        the prompt.
    Submodules are built in peft's order (embedding, lstm_head, mlp_head) with PyTorch default
    inits, so a seeded build equals peft's ``PromptEncoder`` bit for bit.
    """

    def __init__(self, n_virtual: int, dim: int, kind: str = "mlp", hidden: Optional[int] = None,
                 num_layers: int = 2, dropout: float = 0.0, mlp_layers: Optional[int] = None) -> None:
        """Args:
            n_virtual: number of virtual tokens.
            dim: embedding width d.
            kind: "mlp" | "lstm" | "lstm_uni".
            hidden: encoder width H (None -> d).
            num_layers: LSTM layers (ignored by kind "mlp"; see mlp_layers).
            dropout: LSTM inter-layer dropout; for "mlp" only used when mlp_layers is given.
            mlp_layers: None for peft's MLP (2 hidden layers, no dropout); an int k >= 1 for a
                k-hidden-layer MLP with dropout after each ReLU.
        """
        super().__init__()
        h = hidden or dim
        self.kind = kind
        self.embedding = SoftPrompt(n_virtual, dim)
        self.lstm_head: Optional[nn.LSTM] = None
        self.mlp_head: Optional[nn.Sequential] = None
        if kind == "mlp":
            if mlp_layers is None:
                self.mlp_head = nn.Sequential(nn.Linear(dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                              nn.Linear(h, dim))
            else:
                self.mlp_head = nn.Sequential(*_deep_mlp(dim, h, mlp_layers, dropout))
        elif kind == "lstm":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=h, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, dim))
        elif kind == "lstm_uni":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=dim, num_layers=num_layers, dropout=dropout,
                                     bidirectional=False, batch_first=True)
        else:
            raise ValueError(f"kind={kind!r}; expected 'mlp', 'lstm' or 'lstm_uni'")

    def forward(self) -> torch.Tensor:
        """Returns: the prompt, [n_virtual, d] fp32.

        The encoder runs once on a batch of one (1, n_virtual, d), as peft does, so the result
        does not depend on the data batch size.
        """
        x = self.embedding.weight[None]  # (1, n, d)
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]  # (1, n, H) uni / (1, n, 2H) bi
        if self.mlp_head is not None:
            x = self.mlp_head(x)  # (1, n, d)
        return x[0]


def _deep_mlp(dim: int, hidden: int, n_hidden: int, dropout: float) -> list[nn.Module]:
    """Linear(d,H)-ReLU-[Drop], (n_hidden-1) x Linear(H,H)-ReLU-[Drop], Linear(H,d)."""
    if n_hidden < 1:
        raise ValueError(f"mlp_layers={n_hidden}; expected >= 1")
    layers: list[nn.Module] = []
    width = dim
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(hidden, dim))
    return layers
