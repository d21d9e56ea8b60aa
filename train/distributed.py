"""How the training loop spreads one model over ``torchrun`` processes: DDP or FSDP2.

- ``ddp``: every process holds the whole model; ``DistributedDataParallel`` all-reduces the
  gradients of the trainable parameters (the frozen base is never communicated).
- ``fsdp2``: the frozen base is sharded with ``torch.distributed.fsdp.fully_shard``, one unit
  per transformer block (the classes a Hugging Face model lists in ``_no_split_modules``) plus
  the root, so each process stores 1/N of it and gathers one block at a time for forward and
  backward. NF4 bases shard too: ``NF4Linear`` holds its packed codes as a frozen uint8
  parameter. The trainable adapter tensors are left out of the shards (``ignored_params``): they
  are small, stay ordinary replicated tensors, and their gradients are averaged by one flat
  all-reduce per optimizer step, exactly what DDP would give. So the optimizer, clipping,
  checkpoints (adapter-only, rank 0 writes) and resume are the same code for every strategy.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["STRATEGIES", "wrap", "accumulate", "average_gradients", "forward_needs_all_ranks",
           "fsdp_units"]

STRATEGIES = ("ddp", "fsdp2")


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one: modules whose class a Hugging Face model
    inside ``model`` names in ``_no_split_modules`` (outermost first; none: only the root)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    units, inside = [], set()
    for m in model.modules():
        if type(m).__name__ in names and id(m) not in inside:
            units.append(m)
            inside.update(id(c) for c in m.modules())
    return units


def wrap(model: nn.Module, strategy: str, world: int, device: torch.device) -> nn.Module:
    """The module the loop calls: ``model`` itself (one process or FSDP2, sharded in place) or
    its DDP wrapper.

    Args:
        model: the adapted model on ``device``, trainable flags final.
        strategy: one of ``STRATEGIES``.
        world: number of processes; 1 returns ``model`` untouched.
        device: this process's device (the FSDP2 mesh's device type).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed={strategy!r}: expected one of {STRATEGIES}")
    if world == 1:
        return model
    if strategy == "ddp":
        # DDP buckets only parameters that require grad: the frozen base costs no all-reduce.
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world,))
    trainable = {p for p in model.parameters() if p.requires_grad}
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    return model


def _unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "_orig_mod", net)  # a torch.compile'd module holds the original


def _is_fsdp2(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(_unwrap(net), FSDPModule)


def accumulate(net: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's forward+backward: DDP skips its all-reduce (``no_sync``)
    on all but the last micro-batch of a step; FSDP2 and one process need nothing."""
    if isinstance(_unwrap(net), nn.parallel.DistributedDataParallel) and not last:
        return _unwrap(net).no_sync()
    return contextlib.nullcontext()


def average_gradients(net: nn.Module, params: Iterable[nn.Parameter], world: int) -> None:
    """Under FSDP2, average the replicated trainable gradients over the processes (one flat
    all-reduce per dtype); DDP did it during backward, one process has nothing to do."""
    if world == 1 or not _is_fsdp2(net):
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # SUM (gloo has no AVG)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def forward_needs_all_ranks(net: nn.Module) -> bool:
    """Whether every process must run each forward (FSDP2 gathers shards collectively), so
    evaluation runs on all ranks instead of rank 0 alone."""
    return _is_fsdp2(net)
