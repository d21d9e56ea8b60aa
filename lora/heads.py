"""TrainedCopy: a frozen module kept aside plus a trainable deep copy used in its place."""
from __future__ import annotations

import copy
from typing import Any

from torch import nn


class TrainedCopy(nn.Module):
    """Holds ``original`` (frozen, restored by ``remove_lora``) and ``trained`` (a trainable
    deep copy that runs in forward). This is how ``modules_to_save`` heads such as
    ``classifier`` are fine-tuned in full next to the adapters.

    Args:
        original: the module to copy; its parameters are frozen, its object kept unchanged.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.trained = copy.deepcopy(original)
        for p in self.original.parameters():
            p.requires_grad_(False)
        for p in self.trained.parameters():
            p.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.trained(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # model code may read attributes of the head (e.g. `score.weight`): serve the trained copy's
        try:
            return super().__getattr__(name)
        except AttributeError:
            trained = self.__dict__.get("_modules", {}).get("trained")
            if trained is None:
                raise
            return getattr(trained, name)
