"""Trainable parameters come in peft's order (the head copy, then the prompt or prefix encoder).

The order matters to anything that reduces over all trainable tensors: the global grad norm that
clipping divides by is a sum over tensors, and summed in another order it can differ in the last
bit, after which a run at a high learning rate drifts away from peft's.
"""
from __future__ import annotations

import pytest
import torch

from softprompt import PrefixConfig, PromptConfig
from tests.softprompt.pairs import batch, build_pair
from tests.softprompt.prefix_pairs import build_prefix_pair

CASES = {
    "prompt": lambda: build_pair("bert", PromptConfig(method="prompt", n_virtual=5), task="seq_cls"),
    "ptuning_mlp": lambda: build_pair("bert", PromptConfig(method="ptuning", n_virtual=5, encoder="mlp"),
                                      task="seq_cls"),
    "prefix": lambda: build_prefix_pair("bert", PrefixConfig(n_virtual=5), task="seq_cls"),
}


def _roles(names: list[str]) -> list[str]:
    """'head.weight' / 'encoder.embedding.weight', from either library's parameter names."""
    out = []
    for n in names:
        if n.startswith("head.") or "modules_to_save.default." in n:
            out.append("head." + n.rsplit(".", 1)[1])
        else:
            tail = n.split("_encoder.", 1)[1].replace("default.", "", 1)
            out.append("encoder." + ("embedding." + tail if tail == "weight" else tail))
    return out


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_order_is_peft_order(case):
    ours, ref = CASES[case]()
    assert _roles([n for n, _ in _trainable(ours)]) == _roles([n for n, _ in _trainable(ref)])
    assert [p.shape for _, p in _trainable(ours)] == [p.shape for _, p in _trainable(ref)]
    assert [p.shape for p in ours.adapter_parameters()] == [p.shape for _, p in _trainable(ref)]


@pytest.mark.parametrize("case", list(CASES))
def test_global_grad_norm_equals_peft_bitwise(case):
    ours, ref = CASES[case]()
    data = batch("bert", pad="right", token_types=True)
    labels = torch.tensor([0, 2, 1])
    for model in (ours, ref):
        model(**data, labels=labels).loss.backward()
    norms = [torch.nn.utils.get_total_norm([p.grad for _, p in _trainable(m)]) for m in (ours, ref)]
    assert torch.equal(norms[0].view(torch.int32), norms[1].view(torch.int32)), norms
