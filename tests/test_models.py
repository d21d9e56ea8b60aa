"""The tiny test backbones are reproducible: every equivalence test relies on it."""
import pytest
import torch

from tests.models import CAUSAL_FAMILIES, tiny_causal_lm, tiny_classifier, tiny_tokenizer


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_same_seed_gives_bitwise_same_model(family):
    a, b = tiny_causal_lm(family), tiny_causal_lm(family)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_tokenizer_ids_fit_every_model():
    tok = tiny_tokenizer()
    ids = tok("下面是一段人与机器人的对话。")["input_ids"]
    assert ids[0] == tok.bos_token_id
    for family in ("bert",) + CAUSAL_FAMILIES:
        assert max(ids) < tiny_classifier(family).config.vocab_size
