"""torch.compile traces a soft-prompt forward without graph breaks in our code."""
import os

import pytest
import torch

import softprompt
from softprompt import PromptConfig, PromptModel
from tests.models import tiny_bert_classifier, tiny_causal_lm


def _our_breaks(model, **batch) -> list[str]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    ours = os.path.dirname(softprompt.__file__) + os.sep
    return [f"{frame.filename}:{frame.lineno} {reason.reason.splitlines()[0]}"
            for reason in explained.break_reasons for frame in reason.user_stack
            if frame.filename.startswith(ours)]


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_forward_has_no_graph_break_in_softprompt(method, task):
    backbone = tiny_bert_classifier() if task == "seq_cls" else tiny_causal_lm("llama")
    model = PromptModel(backbone, PromptConfig(method=method, n_virtual=4), task=task)
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    labels = torch.tensor([0, 1]) if task == "seq_cls" else ids
    assert _our_breaks(model, input_ids=ids, attention_mask=mask, labels=labels) == []
