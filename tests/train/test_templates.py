"""Templates: one tokenization per conversation, labels on the answers, held to the tokenizer's own rendering."""
from __future__ import annotations

import pytest

from tests.models import tiny_tokenizer
from train.evaluate import answer_token_ids
from train.templates import (IGNORE_INDEX, TemplateError, encode_conversation, generation_prompt, render,
                             resolve_template)

# a ChatML-like template whose answers are marked with {% generation %}, so transformers' own
# return_assistant_tokens_mask gives an independent reference for which tokens carry labels
CHAT = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\n' }}{% generation %}"
        "{{ m['content'] + '</s>' }}{% endgeneration %}{{ '\n' }}{% else %}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + '</s>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# SmolLM2-Instruct's shape: a default system turn when the conversation has none
CHAT_DEFAULT_SYSTEM = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                       "{{ '<|system|>\nbe nice</s>\n' }}{% endif %}" + CHAT[len("{% for m in messages %}"):])
TALK = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "great movie"}, {"role": "user", "content": "and the acting?"},
        {"role": "assistant", "content": "wonderful , too long ."}]


def chat_tokenizer(template: str = CHAT):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [CHAT, CHAT_DEFAULT_SYSTEM])
@pytest.mark.parametrize("turns", [(0, 3), (0, 5), (1, 5)])
def test_chat_ids_and_labels_equal_the_tokenizers_own(turns, template):
    tok, msgs = chat_tokenizer(template), TALK[slice(*turns)]
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    enc = encode_conversation(tok, msgs, "chat", max_length=1000)
    assert enc["input_ids"] == ref["input_ids"]
    assert [int(x != IGNORE_INDEX) for x in enc["labels"]] == ref["assistant_masks"]
    assert all(x in (IGNORE_INDEX, i) for x, i in zip(enc["labels"], enc["input_ids"]))
    assert sum(ref["assistant_masks"]) > 0
    assert enc["prompt_len"] == ref["assistant_masks"].index(1)


def test_a_template_that_renders_prefixes_differently_is_refused():
    tok = chat_tokenizer(CHAT.replace("'</s>\n' }}{% endif %}", "'</s>\n' }}{% endif %}{% if loop.last %}{{ 'END' }}{% endif %}"))
    assert tok.apply_chat_template(TALK[1:3], tokenize=False).endswith("END")
    with pytest.raises(TemplateError, match="renders the conversation up to turn 1 differently"):
        encode_conversation(tok, TALK[1:3], "chat", max_length=100)


def test_generation_prompt_equals_add_generation_prompt():
    tok = chat_tokenizer()
    ref = tok.apply_chat_template(TALK[:4], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert generation_prompt(tok, TALK[:4], "chat") == ref["input_ids"]


def test_seed_template_is_tokenized_once_without_a_lone_space():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "Is the sentiment positive or negative?\ngreat movie"},
            {"role": "assistant", "content": "positive"}]
    text = "Human: Is the sentiment positive or negative?\ngreat movie\n\nAssistant: positive</s>"
    assert render(tok, msgs, "seed")[0] == text
    enc = encode_conversation(tok, msgs, "seed", max_length=1000)
    assert enc["input_ids"] == tok(text)["input_ids"]  # one tokenization, BOS included
    answer = [x for x in enc["labels"] if x != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(answer) == ["Ġpositive", "</s>"]  # the space belongs to the answer token
    assert enc["labels"][:enc["prompt_len"]] == [IGNORE_INDEX] * enc["prompt_len"]
    assert tok.convert_ids_to_tokens(generation_prompt(tok, msgs[:1], "seed"))[-2:] == ["Assistant", ":"]
    # the answer id the accuracy reads is the one training labels
    assert answer_token_ids(tok, ["positive"], "seed", "Is the sentiment positive or negative?") == [answer[0]]


def test_seed_multi_turn_and_none_renderings():
    tok = tiny_tokenizer()
    text, spans = render(tok, TALK, "seed")
    assert text == ("be nice\n\nHuman: hello world\n\nAssistant: great movie</s>Human: and the acting?\n\n"
                    "Assistant: wonderful , too long .</s>")
    assert [text[a:b] for a, b in spans] == [" great movie</s>", " wonderful , too long .</s>"]
    text, spans = render(tok, TALK[1:3], "none")
    assert text == "hello world\ngreat movie</s>" and [text[a:b] for a, b in spans] == ["great movie</s>"]
    enc = encode_conversation(tok, TALK, "seed", max_length=1000)
    labelled = tok.decode([x for x in enc["labels"] if x != IGNORE_INDEX])
    assert labelled == " great movie</s> wonderful , too long .</s>"


def test_auto_and_errors():
    assert resolve_template("auto", chat_tokenizer()) == "chat"
    assert resolve_template("auto", tiny_tokenizer()) == "seed"
    with pytest.raises(TemplateError, match="no chat_template"):
        resolve_template("chat", tiny_tokenizer())
    with pytest.raises(TemplateError, match="template='fancy'"):
        resolve_template("fancy", tiny_tokenizer())


def test_truncation_keeps_the_left_part():
    tok = tiny_tokenizer()
    full = encode_conversation(tok, TALK, "seed", max_length=1000)
    cut = encode_conversation(tok, TALK, "seed", max_length=12)
    assert cut["input_ids"] == full["input_ids"][:12] and cut["labels"] == full["labels"][:12]
