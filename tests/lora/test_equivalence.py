"""Our LoRA against peft 0.21.2, built in the same test, over the tiny model families."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lora import LoRALinear, TrainedCopy, add_lora, lora_parameters, merge_lora, remove_lora, trainable_summary, unmerge_lora
from lora.inject import adapter_tensors

from .conftest import FAMILIES, VARIANTS, base_model, batch, build_pair, our_config, peft_trainable, randomize_both

TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_peft(family: str, variant: str) -> None:
    """Seeded init, trainable set and summary, logits and every adapter gradient equal peft's."""
    ours, pm = build_pair(family, our_config(family, **VARIANTS[variant]))
    mine, theirs = adapter_tensors(ours), peft_trainable(pm)
    # same seed -> the same A (kaiming draws in peft's order), B = 0, same DoRA magnitude
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert {id(p) for p in lora_parameters(ours)} == {id(p) for p in ours.parameters() if p.requires_grad}
    assert trainable_summary(ours) == _peft_summary(pm)

    randomize_both(ours, pm)
    inputs = batch(family)
    out, ref = ours(**inputs), pm(**inputs)
    assert_close(out.logits, ref.logits, **TOL)
    out.loss.backward()
    ref.loss.backward()
    for key in mine:
        assert_close(mine[key].grad, theirs[key].grad, **TOL, msg=key)


def _peft_summary(pm) -> str:
    trainable, total = pm.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_adamw_steps_match_peft(family: str, variant: str) -> None:
    """5 AdamW steps in train mode (model dropout and LoRA dropout on) give peft's losses."""
    ours, pm = build_pair(family, our_config(family, dropout=0.1, **VARIANTS[variant]))
    randomize_both(ours, pm)
    ours.train()
    pm.train()
    inputs = batch(family)
    opt_a = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        losses = []
        for model, opt in ((ours, opt_a), (pm, opt_b)):
            torch.manual_seed(100 + step)  # the same dropout masks, drawn in the same order
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        assert_close(losses[0], losses[1], **TOL, msg=f"step {step}")


def _perturb(model, seed: int = 5) -> None:
    """Make B non-zero and the DoRA magnitude differ from the row norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in adapter_tensors(model).items():
            if "lora_B" in key or "magnitude" in key:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", ["lora", "dora", "all-linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_remove(family: str, variant: str) -> None:
    """merged == unmerged; merge twice == once; unmerge undoes; remove gives back the same objects
    and bitwise outputs; remove(merge=True) keeps the merged function."""
    cfg = our_config(family, **VARIANTS[variant])
    model = base_model(family)
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    originals = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        base_logits = model(**inputs).logits

        torch.manual_seed(0)
        add_lora(model, cfg)
        _perturb(model)
        unmerged = model(**inputs).logits
        assert not torch.equal(unmerged, base_logits)  # the adapter does change the output
        remove_lora(model)
        assert all(m is originals[n] for n, m in model.named_modules())
        assert set(dict(model.named_modules())) == set(originals)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert torch.equal(model(**inputs).logits, base_logits)  # bitwise

        torch.manual_seed(0)
        add_lora(model, cfg)
        _perturb(model)
        merge_lora(model)
        merged_w = {n: p.clone() for n, p in model.named_parameters()}
        merged = model(**inputs).logits
        assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        merge_lora(model)  # idempotent
        assert all(torch.equal(p, merged_w[n]) for n, p in model.named_parameters())
        unmerge_lora(model)
        unmerge_lora(model)  # idempotent
        assert_close(model(**inputs).logits, unmerged, atol=1e-6, rtol=1e-6)
        merge_lora(model)
        merged = model(**inputs).logits
        remove_lora(model, merge=True)
        assert not any(isinstance(m, (LoRALinear, TrainedCopy)) for m in model.modules())
        assert torch.equal(model(**inputs).logits, merged)
