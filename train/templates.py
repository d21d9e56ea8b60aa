"""Conversation templates: render a conversation once, tokenize it once, label the answers.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``.
Rendering gives one string plus the character spans that carry labels (every assistant turn
and the marker that ends it); the string is tokenized once with an offsets mapping, and a token
is labelled when its characters overlap a labelled span. Nothing is tokenized in pieces, so the
token ids are exactly what the model sees at generation time.

Templates:
- ``seed``: ``"Human: {user}".strip() + "\\n\\nAssistant: "`` then the answer and the eos token
  (one such pair per turn; a system message is written first, followed by a blank line);
  tokenized with the tokenizer's own special tokens (e.g. a BOS). The space after
  ``Assistant:`` is labelled with the answer (tokenizers merge it into the answer's first
  token), so a generation prompt ends at ``:``.
- ``chat``: the tokenizer's own ``apply_chat_template``; each answer's start is found by
  rendering the conversation up to that turn with ``add_generation_prompt=True``, its end by
  rendering through that turn; tokenized without extra special tokens, as
  ``apply_chat_template(tokenize=True)`` does.
- ``none``: the raw texts, one turn a line, each answer followed by eos.
- ``auto``: ``chat`` when the tokenizer has a chat template, else ``seed``.
"""
from __future__ import annotations

__all__ = ["TEMPLATES", "IGNORE_INDEX", "TemplateError", "resolve_template", "format_prompt", "render",
           "encode_conversation", "generation_prompt"]

TEMPLATES = ("auto", "chat", "seed", "none")
IGNORE_INDEX = -100  # label value that cross-entropy skips
_PLACEHOLDER = "x"   # stands in for the answer when only the prompt is wanted


class TemplateError(ValueError):
    """A conversation or tokenizer that a template cannot render or label."""


def resolve_template(name: str, tokenizer) -> str:
    """``auto`` -> ``chat`` when the tokenizer carries a chat template, else ``seed``; checks the rest."""
    if name not in TEMPLATES:
        raise TemplateError(f"template={name!r}; expected one of {TEMPLATES}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        name = "chat" if has_chat else "seed"
    if name == "chat" and not has_chat:
        raise TemplateError("template=chat but the tokenizer has no chat_template; use seed or none")
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("the templates need a fast tokenizer (offsets mapping); got a slow one")
    if name in ("seed", "none"):
        eos = tokenizer.eos_token
        if eos is None or tokenizer(eos, add_special_tokens=False)["input_ids"] != [tokenizer.eos_token_id]:
            raise TemplateError(f"template={name} ends answers with eos, but the tokenizer's eos token "
                                f"{eos!r} does not tokenize to its id {tokenizer.eos_token_id}")
    return name


def format_prompt(instruction: str, input: str = "") -> str:
    """The seed template's prompt: ``"Human: {instruction}\\n{input}".strip() + "\\n\\nAssistant: "``."""
    return f"Human: {instruction}\n{input}".strip() + "\n\nAssistant: "


def _render_plain(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    for m in messages:
        if m["role"] == "assistant":
            # seed: the space after "Assistant:" belongs to the answer, as byte-level and
            # sentencepiece tokenizers merge it into the answer's first token; the prompt then
            # ends at ":" whatever the answer is
            start = len(text) - 1 if template == "seed" and text.endswith(" ") else len(text)
            text += m["content"] + tokenizer.eos_token
            spans.append((start, len(text)))
        elif template == "seed":
            if m["role"] == "system":
                text += m["content"] + "\n\n"
            else:  # Human: {instruction}\n{input}, stripped, as the seeds wrote it
                text += f"Human: {m['content']}".strip() + "\n\nAssistant: "
        else:
            text += m["content"] + "\n"
    return text, spans


def _chat(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    text = _chat(tokenizer, messages, generation=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _chat(tokenizer, messages[:i], generation=True) if i else ""
        through = _chat(tokenizer, messages[:i + 1], generation=False)
        if not (text.startswith(before) and text.startswith(through)) or len(through) < len(before):
            raise TemplateError(f"the chat template renders the conversation up to turn {i} differently "
                                f"from the whole conversation, so turn {i}'s answer cannot be located")
        # the answer and its end-of-turn marker; trailing whitespace after the marker stays unlabelled
        end = len(through.rstrip()) if through.rstrip() else len(through)
        spans.append((len(before), max(end, len(before))))
    return text, spans


def render(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as one string and the character spans ``[start, end)`` that carry labels.

    Args:
        tokenizer: a Hugging Face tokenizer (its eos token / chat template are used).
        messages: ``[{"role", "content"}, ...]``.
        template: a resolved template name (``seed``, ``chat`` or ``none``).
    """
    if template == "chat":
        return _render_chat(tokenizer, messages)
    if template in ("seed", "none"):
        return _render_plain(tokenizer, messages, template)
    raise TemplateError(f"template={template!r}; expected a resolved name: seed, chat or none")


def _tokenize(tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[int], list[int]]:
    """ids, labels, and per answer span the index of its first token."""
    text, spans = render(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=template != "chat", return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels, firsts = [], [None] * len(spans)
    for i, (tok, (s, e)) in enumerate(zip(ids, enc["offset_mapping"])):
        hits = [k for k, (a, b) in enumerate(spans) if e > s and s < b and e > a]
        labels.append(tok if hits else IGNORE_INDEX)
        for k in hits:
            firsts[k] = i if firsts[k] is None else firsts[k]
    return ids, labels, [len(ids) if f is None else f for f in firsts]


def encode_conversation(tokenizer, messages: list[dict], template: str, max_length: int) -> dict:
    """Token ids and labels of one conversation, tokenized once.

    Returns:
        ``{"input_ids", "labels", "prompt_len"}``: labels equal the ids on tokens that overlap
        an answer span, -100 elsewhere; ``prompt_len`` is the first labelled position (the
        length of the prompt a generation would start from). Cut to ``max_length`` from the
        right.
    """
    ids, labels, _ = _tokenize(tokenizer, messages, template)
    prompt_len = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(ids))
    return {"input_ids": ids[:max_length], "labels": labels[:max_length],
            "prompt_len": min(prompt_len, max_length)}


def generation_prompt(tokenizer, messages: list[dict], template: str) -> list[int]:
    """The ids a generation starts from: the conversation, then an assistant turn to be written.

    The prompt is cut from the encoding of the conversation with a placeholder answer, so its
    tokens are exactly the ones training saw before an answer (e.g. a space that the answer's
    first token absorbs stays out of the prompt).
    """
    ids, _, firsts = _tokenize(tokenizer, list(messages) + [{"role": "assistant", "content": _PLACEHOLDER}],
                               template)
    return ids[:firsts[-1]]
