"""torch.compile traces a prefix-tuning training forward without graph breaks in our code."""
import pytest
import torch

from softprompt import PrefixConfig, PrefixModel
from tests.models import tiny_bert_classifier, tiny_causal_lm
from tests.softprompt.test_compile import _our_breaks


@pytest.mark.parametrize("task, projection", [("seq_cls", False), ("causal_lm", True)])
def test_forward_has_no_graph_break_in_softprompt(task, projection):
    backbone = tiny_bert_classifier() if task == "seq_cls" else tiny_causal_lm("llama")
    model = PrefixModel(backbone, PrefixConfig(n_virtual=4, projection=projection), task=task).train()
    ids = torch.randint(3, 100, (2, 6))
    labels = torch.tensor([0, 1]) if task == "seq_cls" else ids
    assert _our_breaks(model, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels) == []
