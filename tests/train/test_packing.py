"""Packing keeps examples apart (each example's loss equals its unpacked loss); length-grouped batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models import tiny_causal_lm
from tests.train.helpers import ToyAdapter, instruct_examples
from train.packing import PackCollator, check_packing, disable_cache, grouped_batches, pack_examples


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_each_packed_example_has_its_unpacked_loss(family):
    model = tiny_causal_lm(family)
    assert disable_cache(model) == 1
    examples = instruct_examples(12, max_length=40)
    rows = pack_examples(examples, max_length=64)
    assert len(rows) < len(examples) and sorted(i for r in rows for i in r["members"]) == list(range(12))
    batch = PackCollator(pad_id=0)(rows)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # (B, T, V)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")  # (B, T-1)
        packed_total, packed_count, alone_total, alone_count = 0.0, 0, 0.0, 0
        for b, row in enumerate(rows):
            start = 0
            for i, n in zip(row["members"], row["lengths"]):
                e = examples[i]
                assert batch["labels"][b, start] == -100  # nothing is predicted across a boundary
                assert batch["position_ids"][b, start:start + n].tolist() == list(range(n))
                targets = batch["labels"][b, start + 1:start + n]
                count = int((targets != -100).sum())
                packed = ce[b, start:start + n - 1].sum() / count
                alone = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
                torch.testing.assert_close(packed, alone, atol=1e-6, rtol=1e-6)
                packed_total, packed_count = packed_total + float(packed) * count, packed_count + count
                alone_total, alone_count = alone_total + float(alone) * count, alone_count + count
                start += n
        # the model's own mean over the packed batch is the token-weighted mean of the examples
        whole = model(**batch).loss
        torch.testing.assert_close(float(whole), alone_total / alone_count, atol=1e-6, rtol=1e-6)


def test_rows_fill_and_respect_max_length():
    examples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (9, 3, 7, 1, 4, 6, 2)]
    rows = pack_examples(examples, max_length=10)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == 32 and len(rows) == 4  # 32 tokens need >= 4 rows of 10
    assert pack_examples(examples, max_length=10) == rows  # deterministic
    batch = PackCollator(pad_id=5)(rows)
    short = min(range(len(rows)), key=lambda b: len(rows[b]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert (batch["input_ids"][short, n:] == 5).all() and (batch["labels"][short, n:] == -100).all()


class _NoBoundaries(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, position_ids=None, **kw):
        return self.inner(input_ids=input_ids)  # ignores position ids: packed examples see each other


def test_check_packing_accepts_hf_models_and_refuses_others():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="attend to each other"):  # with a KV cache, boundaries are not read
        check_packing(model, torch.device("cpu"), vocab=100)
    disable_cache(model)
    check_packing(model, torch.device("cpu"), vocab=100)
    with pytest.raises(ValueError, match="attend to each other"):
        check_packing(_NoBoundaries(model), torch.device("cpu"), vocab=100)
    with pytest.raises(ValueError, match="takes position_ids"):
        check_packing(ToyAdapter(model), torch.device("cpu"), vocab=100)


def test_grouped_batches_cover_the_epoch_with_similar_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (1000,), generator=g).tolist()
    batches = grouped_batches(lengths, 8, seed=0, epoch=0, mega=10)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 1000 and all(len(b) == 8 for b in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    plain = [list(range(k, k + 8)) for k in range(0, 1000, 8)]  # file order: lengths are random
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) / len(plain)
    assert spread < plain_spread / 5
    assert grouped_batches(lengths, 8, seed=0, epoch=0, mega=10) == batches  # a function of (seed, epoch)
    assert grouped_batches(lengths, 8, seed=0, epoch=1, mega=10) != batches
    # two processes: together their j-th batches are the single-process j-th batch of twice the size
    one = grouped_batches(lengths, 8, seed=0, epoch=0, world=1, mega=10)
    two = [grouped_batches(lengths, 4, seed=0, epoch=0, rank=r, world=2, mega=10) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*two)] == [sorted(b) for b in one]
