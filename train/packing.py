"""Packing several examples into one row, and length-grouped batches (the lighter option).

Packing (``pack_examples`` + ``PackCollator``): examples are placed into rows of at most
``max_length`` tokens (first fit, longest first). Each example keeps its own position ids
(0, 1, ... restarting per example), its first label is -100 (no target crosses a boundary) and
the batch carries no ``attention_mask``: Hugging Face models then read the example boundaries
from the restarting ``position_ids`` and keep attention inside each example (a block-diagonal
causal mask for eager / sdpa, the variable-length kernels for flash attention).
Hugging Face reads the boundaries only when the forward builds no KV cache, so
``disable_cache`` turns the cache off for training (generation passes its own ``use_cache``),
and ``check_packing`` verifies that the model keeps examples apart before training starts.

Grouping (``grouped_batches``): each epoch's shuffled order is cut into mega-batches of
``50 x batch`` examples, each sorted by length and cut into batches, and the batch order is
shuffled again; every batch then pads to a similar length.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .templates import IGNORE_INDEX

__all__ = ["pack_examples", "PackCollator", "disable_cache", "check_packing", "grouped_batches", "loop_batches"]


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Rows of concatenated examples, each row at most ``max_length`` tokens.

    Args:
        examples: encoded ``{"input_ids", "labels"}`` (token labels) examples.
        max_length: the row capacity; an example longer than this is cut to it.
    Returns:
        ``[{"input_ids", "labels", "position_ids", "lengths", "members"}, ...]``: ``members``
        are the indices of the row's examples, ``lengths`` their token counts. Deterministic: the same examples give the same rows.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []   # example indices per row
    free: list[int] = []         # tokens left per row
    for i in order:
        n = min(len(examples[i]["input_ids"]), max_length)
        for r, room in enumerate(free):
            if room >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_length - n)
    packed = []
    for members in rows:
        ids, labels, pos, lengths = [], [], [], []
        for i in members:
            e = examples[i]
            n = min(len(e["input_ids"]), max_length)
            ids += e["input_ids"][:n]
            labels += [IGNORE_INDEX] + list(e["labels"][1:n])  # the first token has no target in its example
            pos += range(n)
            lengths.append(n)
        packed.append({"input_ids": ids, "labels": labels, "position_ids": list(pos), "lengths": lengths,
                       "members": members})
    return packed


@dataclass(frozen=True)
class PackCollator:
    """Batches packed rows: ``input_ids``, ``labels`` and ``position_ids`` (B, T); no attention mask.

    Rows are right-padded to the longest one; padding has label -100 and position id 0, so every
    padding token is a one-token example of its own that nothing attends to.

    Args:
        pad_id: id written into padded ``input_ids`` positions.
    """
    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
                 "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
                 "position_ids": torch.zeros((len(rows), width), dtype=torch.long)}
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            for key in batch:
                batch[key][b, :n] = torch.tensor(r[key], dtype=torch.long)
        return batch


def disable_cache(model: torch.nn.Module) -> int:
    """Set ``config.use_cache = False`` on every Hugging Face model inside; returns how many.

    With a cache, transformers' mask builder does not look for packed sequences in
    ``position_ids``; a training forward never needs the cache.
    """
    n = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False
            n += 1
    return n


@torch.no_grad()
def check_packing(model: torch.nn.Module, device: torch.device, vocab: int, atol: float = 1e-4) -> None:
    """Raise unless ``model`` keeps two packed examples apart (logits equal to separate runs).

    Args:
        model: a causal LM whose forward takes ``input_ids`` and ``position_ids``.
        device: where the model lives.
        vocab: ids are drawn below this.
        atol: allowed logit difference.
    """
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(3, vocab, (1, n), generator=gen).to(device) for n in (5, 7))
    was = model.training
    model.eval()
    try:
        packed = model(input_ids=torch.cat([a, b], 1),
                       position_ids=torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)).logits
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
    except TypeError as e:
        raise ValueError(f"--packing needs a model whose forward takes position_ids ({e})") from None
    finally:
        model.train(was)
    err = float((packed.float() - alone.float()).abs().max())
    if err > atol:
        raise ValueError(f"--packing: this model lets packed examples attend to each other (logits differ by "
                         f"{err:.2e}); its attention does not read example boundaries from position_ids. "
                         f"Use --group-by-length instead")


def grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, rank: int = 0,
                    world: int = 1, mega: int = 50) -> list[list[int]]:
    """This process's batches of one epoch, each of examples of similar length.

    Args:
        lengths: token count of each example.
        batch_size: examples per batch per process.
        seed, epoch: the order is a function of these only (resume reads the same batches).
        rank, world: under DDP each global batch of ``batch_size * world`` examples is dealt
            out as positions ``rank, rank + world, ...``.
        mega: mega-batch size in global batches.
    Returns:
        Index lists; incomplete last batches are dropped.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    glob = batch_size * world
    if len(order) < glob:
        raise ValueError(f"batch_size={batch_size} x {world} processes exceeds the {len(order)} examples")
    step = glob * mega
    batches = []
    for s in range(0, len(order), step):
        chunk = sorted(order[s:s + step], key=lambda i: -lengths[i])
        batches += [chunk[i:i + glob] for i in range(0, len(chunk) - glob + 1, glob)]
    rng.shuffle(batches)
    return [g[rank::world] for g in batches]


def loop_batches(examples: list[dict], data_cfg, loop_cfg, pad_id: int, side: str = "right") -> tuple:
    """``(examples, collate, batch_order)`` for ``train.loop.train``, as ``data_cfg`` asks.

    Packing: the packed rows and a ``PackCollator``; grouping: the examples, a ``PadCollator``
    and ``grouped_batches`` as the loop's batch order; else the examples and a ``PadCollator``.
    """
    from .data import PadCollator  # data imports templates only; no cycle through here
    if data_cfg.packing:
        return pack_examples(examples, data_cfg.max_length), PackCollator(pad_id), None
    collate = PadCollator(pad_id, side)
    if data_cfg.group_by_length:
        lengths = [len(e["input_ids"]) for e in examples]
        return examples, collate, lambda epoch, rank, world: grouped_batches(
            lengths, loop_cfg.batch_size, loop_cfg.seed, epoch, rank, world)
    return examples, collate, None
