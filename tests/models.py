"""Tiny random Hugging Face backbones and a locally trained tokenizer for tests.

Every builder seeds torch before constructing, so two calls with the same arguments return
bitwise-identical models (tests build one for us and one for peft and compare).
"""
from __future__ import annotations

import functools

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB = 512  # >= the tokenizer's vocabulary, so every id is valid in every tiny model
HIDDEN = 16
MAX_POS = 64

# model_type -> causal-LM config; hidden 16, 2 layers, 4 heads (2 KV heads where GQA exists)
_CAUSAL_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=MAX_POS,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "bloom": lambda: transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=32, num_hidden_layers=2,
        num_attention_heads=4, word_embed_proj_dim=HIDDEN, max_position_embeddings=MAX_POS,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
CAUSAL_FAMILIES = tuple(_CAUSAL_CONFIGS)


def causal_config(family: str) -> transformers.PretrainedConfig:
    """The tiny config of one causal-LM family (see ``CAUSAL_FAMILIES``)."""
    return _CAUSAL_CONFIGS[family]()


def tiny_causal_lm(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random fp32 causal LM in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(causal_config(family))
    return model.eval()


def bert_config(num_labels: int = 3) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=32, max_position_embeddings=MAX_POS, type_vocab_size=2,
        num_labels=num_labels, pad_token_id=0)


def tiny_bert_classifier(num_labels: int = 3, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random fp32 BertForSequenceClassification in eval mode."""
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(bert_config(num_labels))
    return model.eval()


def tiny_classifier(family: str, num_labels: int = 2, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random sequence classifier: ``"bert"`` or any causal family."""
    if family == "bert":
        return tiny_bert_classifier(num_labels, seed)
    config = causal_config(family)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


_CORPUS = [
    "the movie was great and the acting was wonderful",
    "a dull , boring and far too long film",
    "Human: Is the sentiment of this review positive or negative?",
    "Assistant: positive", "Assistant: negative",
    "下面是一段人与机器人的对话。",
    "hello world , this is a tiny tokenizer for tests .",
] * 20


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok.to_str()


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here; adds a BOS (id 1) like Llama's."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return tok
