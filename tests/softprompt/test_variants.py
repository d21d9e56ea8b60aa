"""prepend_prompt, the non-peft options, and the promise that the backbone is never modified."""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.testing import assert_close

from softprompt import PromptConfig, PromptEncoder, PromptModel, prepend_prompt
from tests.models import tiny_bert_classifier, tiny_causal_lm
from tests.softprompt.pairs import SEED, batch, causal_labels, peft

TOL = dict(atol=1e-6, rtol=1e-6)


def test_prepend_prompt_shapes_fills_and_dtype():
    prompt = torch.randn(3, 4)
    embeds = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    labels = torch.arange(10).view(2, 5)
    types = torch.ones(2, 5, dtype=torch.long)
    out = prepend_prompt(prompt, embeds, mask, labels, types)
    assert out["inputs_embeds"].shape == (2, 8, 4) and out["inputs_embeds"].dtype == torch.bfloat16
    assert torch.equal(out["inputs_embeds"][1, :3], prompt.to(torch.bfloat16))
    assert torch.equal(out["inputs_embeds"][:, 3:], embeds)
    assert torch.equal(out["attention_mask"], torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1))
    assert out["labels"][:, :3].eq(-100).all() and torch.equal(out["labels"][:, 3:], labels)
    assert out["token_type_ids"][:, :3].eq(0).all() and torch.equal(out["token_type_ids"][:, 3:], types)
    cls_first = prepend_prompt(prompt, embeds.float(), mask, torch.tensor([1, 0]), insert_at=1)
    assert torch.equal(cls_first["inputs_embeds"][:, 0], embeds[:, 0].float())
    assert torch.equal(cls_first["inputs_embeds"][0, 1:4], prompt)
    assert torch.equal(cls_first["attention_mask"][1], torch.tensor([0, 1, 1, 1, 0, 1, 1, 1]))
    assert torch.equal(cls_first["labels"], torch.tensor([1, 0]))  # per-sequence labels untouched


def test_honoured_mlp_options_build_the_asked_mlp():
    deep = PromptEncoder(4, 16, "mlp", hidden=8, dropout=0.1, mlp_layers=3)
    linears = [m for m in deep.mlp_head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 8), (8, 8), (8, 8), (8, 16)]
    assert sum(isinstance(m, nn.Dropout) for m in deep.mlp_head) == 3
    # two hidden layers and no dropout is peft's MLP, bit for bit from the same seed
    torch.manual_seed(SEED)
    ours = PromptEncoder(4, 16, "mlp", mlp_layers=2)
    torch.manual_seed(SEED)
    ref = peft.tuners.p_tuning.PromptEncoder(peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, token_dim=16, encoder_hidden_size=16,
        num_transformer_submodules=1))
    assert_close(ours(), ref(torch.arange(4)[None])[0], atol=0, rtol=0)


def test_unidirectional_lstm_maps_straight_to_d():
    pm = PromptModel(tiny_causal_lm("llama"), PromptConfig(method="ptuning", n_virtual=4, encoder="lstm_uni",
                                                           encoder_num_layers=1))
    enc = pm.prompt_encoder
    assert enc.mlp_head is None and not enc.lstm_head.bidirectional and enc.lstm_head.hidden_size == 16
    data = batch("llama")
    pm(**data, labels=causal_labels(data)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.adapter_parameters())


def test_encoder_input_from_word_embeddings():
    backbone = tiny_causal_lm("llama")
    pm = PromptModel(backbone, PromptConfig(method="ptuning", n_virtual=5, init="ids", init_ids=(7, 8)))
    rows = backbone.get_input_embeddings().weight[[7, 8, 7, 8, 7]]
    assert torch.equal(pm.table.weight, rows)


def test_real_cls_pooling_reads_the_real_cls():
    """pool='real_cls': the prompt goes after [CLS], so the pooler reads the real [CLS]; checked
    against BERT's pieces run by hand on that sequence."""
    backbone = tiny_bert_classifier()
    pm = PromptModel(backbone, PromptConfig(n_virtual=4, pool="real_cls"), task="seq_cls")
    data = batch("bert", pad="right", token_types=True)
    logits = pm(**data).logits
    emb = backbone.get_input_embeddings()(data["input_ids"])
    prompt = pm.prompt().expand(3, 4, 16)
    seq = torch.cat([emb[:, :1], prompt, emb[:, 1:]], dim=1)
    ones = torch.ones(3, 4, dtype=torch.long)
    mask = torch.cat([data["attention_mask"][:, :1], ones, data["attention_mask"][:, 1:]], dim=1)
    types = torch.cat([data["token_type_ids"][:, :1], 0 * ones, data["token_type_ids"][:, 1:]], dim=1)
    hidden = backbone.bert(inputs_embeds=seq, attention_mask=mask, token_type_ids=types).last_hidden_state
    expected = pm.head(backbone.bert.pooler(hidden))  # the pooler reads index 0: the real [CLS]
    assert_close(logits, expected, **TOL)
    default = PromptModel(tiny_bert_classifier(), PromptConfig(n_virtual=4), task="seq_cls")
    default.prompt_encoder.load_state_dict(pm.prompt_encoder.state_dict())
    assert not torch.allclose(default(**data).logits, logits)


def test_bf16_backbone_keeps_fp32_prompt():
    backbone = tiny_causal_lm("llama").to(torch.bfloat16)
    pm = PromptModel(backbone, PromptConfig(method="ptuning", n_virtual=3, encoder="lstm"))
    assert all(p.dtype == torch.float32 for p in pm.adapter_parameters())
    data = batch("llama")
    out = pm(**data, labels=causal_labels(data))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert pm.table.weight.grad.dtype == torch.float32


def test_backbone_is_never_modified():
    """Train, save-free: after forward, backward, an optimizer step and generate, the backbone
    holds the same module objects, bitwise-equal tensors and no patched methods."""
    backbone = tiny_bert_classifier()
    fresh = tiny_bert_classifier()
    modules = dict(backbone.named_modules())
    pm = PromptModel(backbone, PromptConfig(method="ptuning", n_virtual=3), task="seq_cls")
    opt = torch.optim.AdamW(pm.adapter_parameters(), lr=0.1)
    data = batch("bert", token_types=True)
    pm.train()
    pm(**data, labels=torch.tensor([0, 1, 2])).loss.backward()
    opt.step()
    assert dict(backbone.named_modules()).keys() == modules.keys()
    assert all(modules[n] is m for n, m in backbone.named_modules())
    assert all("forward" not in vars(m) for m in backbone.modules())
    for (n, p), q in zip(backbone.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), n
    assert not any(p.requires_grad for p in backbone.parameters())
    with torch.no_grad():
        backbone.eval()
        fresh.eval()
        assert torch.equal(backbone(**data).logits, fresh(**data).logits)
    causal = tiny_causal_lm("gpt2")
    gen = PromptModel(causal, PromptConfig(n_virtual=2))
    gen.generate(batch("gpt2", pad="left")["input_ids"], max_new_tokens=3)
    assert all("forward" not in vars(m) and "prepare_inputs_for_generation" not in vars(m)
               for m in causal.modules())


def test_peft_freezes_the_same_parameters():
    """Our trainable set has the shapes of peft's (prompt/encoder + head copy), BERT P-Tuning."""
    pm = PromptModel(tiny_bert_classifier(), PromptConfig(method="ptuning", n_virtual=3), task="seq_cls")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(tiny_bert_classifier(), peft.PromptEncoderConfig(
            task_type="SEQ_CLS", num_virtual_tokens=3))
    ours = sorted(tuple(p.shape) for p in pm.parameters() if p.requires_grad)
    theirs = sorted(tuple(p.shape) for p in ref.parameters() if p.requires_grad)
    assert ours == theirs
