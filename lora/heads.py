"""TrainedCopy: a frozen module kept aside plus a trainable deep copy used in its place."""
from __future__ import annotations

import copy
from typing import Any

import torch
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
        # Outside autocast a 16-bit base hands 16-bit hidden states to a copy trained in fp32:
        # run the copy in its own dtype (under autocast the ops cast by themselves).
        p = next(self.trained.parameters(), None)
        if p is not None and p.is_floating_point() and not torch.is_autocast_enabled(p.device.type):
            cast = lambda x: x.to(p.dtype) if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
            args, kwargs = tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}
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
