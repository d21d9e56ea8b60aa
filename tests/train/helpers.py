"""Shared builders for the train tests: a tiny classifier with a trainable toy adapter."""
from __future__ import annotations

import torch

from tests.models import tiny_bert_classifier, tiny_causal_lm, tiny_tokenizer
from train.data import PadCollator, encode_instruction, encode_text


class ToyAdapter(torch.nn.Module):
    """Freezes a backbone and trains a low-rank residual on its input embeddings plus its head.

    It stands in for a real adapter (any nn.Module with frozen and trainable parameters) so the
    loop is tested on its own.
    """

    def __init__(self, backbone: torch.nn.Module, rank: int = 2, head: str | None = None, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        d = backbone.get_input_embeddings().embedding_dim
        self.down = torch.nn.Linear(d, rank, bias=False)
        self.up = torch.nn.Linear(rank, d, bias=False)
        self.drop = torch.nn.Dropout(dropout)
        torch.nn.init.normal_(self.up.weight, std=0.02)
        if head is not None:
            for p in getattr(backbone, head).parameters():
                p.requires_grad_(True)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None):
        emb = self.backbone.get_input_embeddings()(input_ids)  # (B, T, d)
        emb = emb + self.up(self.down(self.drop(emb)))
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.backbone(inputs_embeds=emb, attention_mask=attention_mask, labels=labels, **kw)


TEXTS = ["the movie was great", "a dull , boring film", "wonderful acting", "far too long",
         "hello world", "this is a tiny test", "great and wonderful", "boring and dull"]


def classify_examples(n: int = 32, max_length: int = 16) -> list[dict]:
    tok = tiny_tokenizer()
    recs = [{"text": TEXTS[i % len(TEXTS)] + " x" * (i % 5), "label": i % 2} for i in range(n)]
    return [encode_text(tok, r, max_length) for r in recs]


def instruct_examples(n: int = 32, max_length: int = 40) -> list[dict]:
    tok = tiny_tokenizer()
    recs = [{"instruction": "Is the sentiment positive or negative?", "input": TEXTS[i % 8] + " ." * (i % 4),
             "output": ["negative", "positive"][i % 2] + " ." * (i % 3)} for i in range(n)]
    return [encode_instruction(tok, r, max_length) for r in recs]


def toy_classifier(seed: int = 0) -> ToyAdapter:
    torch.manual_seed(seed + 100)
    return ToyAdapter(tiny_bert_classifier(num_labels=2, seed=seed), head="classifier")


def toy_causal(seed: int = 0, dropout: float = 0.1) -> ToyAdapter:
    torch.manual_seed(seed + 100)
    return ToyAdapter(tiny_causal_lm("llama", seed=seed), dropout=dropout)


def collator() -> PadCollator:
    return PadCollator(pad_id=0)
