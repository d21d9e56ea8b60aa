"""Soft-prompt generation through the backbone's own Hugging Face ``generate``.

``generate_with_prompt`` calls ``backbone.generate`` unchanged, so every GenerationMixin
feature works as documented by Hugging Face: greedy, sampling, beam search, logits processors
(repetition penalty...), stopping criteria, streamers, ``generation_config``, ``max_length``,
EOS handling, ``output_scores`` / ``return_dict_in_generate``. ``generate`` sees only the real
``input_ids``: its lengths, penalties and stopping rules count real tokens, and the returned
ids are the input ids then the new ids, never a virtual token.

For the length of the call a forward pre-hook on the backbone (``PromptInjection``) changes
what each forward receives:

- prefill (no cache yet, or an empty one): ``input_ids`` (B, L) become
  ``inputs_embeds = [prompt; embed(input_ids)]`` (B, n+L, d); the prompt enters once and the
  cache carries it after that;
- every call: a 2-D ``attention_mask`` gets n leading ones (generate's mask does not know the
  virtual columns); ``position_ids`` (which generate derives from that mask) and
  ``token_type_ids`` are dropped, so the model numbers positions from its cache length:
  0..n+L-1 at prefill and n+L+t-1 at step t, as peft does.

The cache is read under either name the forward uses (``past_key_values`` up to transformers
5.23, ``cache`` from 5.24), so nothing depends on generate's internal bookkeeping. A method
that enters as a prefilled cache instead (prefix tuning) overrides ``PromptInjection.prefill``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

CACHE_NAMES = ("past_key_values", "cache")  # the forward's cache argument, before / from 5.24


class PromptInjection:
    """A forward pre-hook (``with_kwargs=True``) that puts a soft prompt in front at prefill.

    Args:
        prompt: [n, d] prompt embeddings (cast to the embedding dtype at use).
        embed: the backbone's input embedding (``get_input_embeddings()``).
    """

    def __init__(self, prompt: torch.Tensor, embed: nn.Module) -> None:
        self.prompt = prompt
        self.embed = embed
        self.n = prompt.shape[0]
        self.prefills = 0  # how many forwards got the prompt (1 per generate call with a cache)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            raise ValueError("generate() passed positional inputs to the forward; expected keywords only")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("PromptModel.generate() builds inputs_embeds itself; pass input_ids only")
        kwargs.pop("position_ids", None)
        kwargs.pop("token_type_ids", None)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"attention_mask has {mask.dim()} dims at generation; expected a 2-D mask "
                                 "(static caches build 4-D masks: use the default dynamic cache)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.n), mask], dim=1)
        if self._is_prefill(kwargs):
            self.prefills += 1
            kwargs = self.prefill(kwargs)
        return args, kwargs

    @staticmethod
    def _is_prefill(kwargs: dict) -> bool:
        cache = next((kwargs[k] for k in CACHE_NAMES if kwargs.get(k) is not None), None)
        return cache is None or int(cache.get_seq_length()) == 0

    def prefill(self, kwargs: dict) -> dict:
        """Replace ``input_ids`` (B, L) by ``inputs_embeds`` [prompt; embed(ids)] (B, n+L, d)."""
        ids = kwargs.pop("input_ids")
        tokens = self.embed(ids)  # (B, L, d)
        block = self.prompt.expand(ids.shape[0], self.n, -1).to(tokens.dtype)  # (B, n, d)
        kwargs["inputs_embeds"] = torch.cat([block, tokens], dim=1)
        return kwargs


def generate_with_prompt(backbone: nn.Module, injection: PromptInjection, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
    """Run ``backbone.generate(input_ids, attention_mask=..., **kwargs)`` with ``injection``
    hooked on the backbone's forward for this call only.

    Args:
        backbone: a Hugging Face causal LM (a ``GenerationMixin``).
        injection: what enters at prefill (``PromptInjection`` or a subclass).
        input_ids: [B, L]; pad a batch on the LEFT and give ``attention_mask``.
        attention_mask: [B, L] or None (generate's default).
        **kwargs: anything ``generate`` takes.
    Returns:
        what ``generate`` returns: [B, L + T] ids, or a ``GenerateOutput`` when asked.
    """
    if attention_mask is not None and bool((attention_mask.sum(dim=1) == 0).any()):
        rows = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} are all padding; every row needs at least one real token")
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate() needs left padding: some rows have a 0 in the last mask column")
    handle = backbone.register_forward_pre_hook(injection, with_kwargs=True)
    try:
        return backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()


def planned_length(backbone: nn.Module, n_virtual: int, input_len: int, kwargs: dict) -> int:
    """The most positions the backbone will see: n_virtual + input + new tokens."""
    cfg = kwargs.get("generation_config") or getattr(backbone, "generation_config", None)
    new = kwargs.get("max_new_tokens", getattr(cfg, "max_new_tokens", None))
    if new is not None:
        return n_virtual + input_len + int(new)
    length = kwargs.get("max_length", getattr(cfg, "max_length", None))
    return n_virtual + max(input_len, int(length or input_len))
