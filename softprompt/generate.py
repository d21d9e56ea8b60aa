"""decode: a small KV-cached decode loop over plain forward calls, the prompt entering at prefill.

Owning the loop (rather than hooking ``generate``'s input preparation) keeps it right across
transformers versions: the cache object the model returns is handed back to it under whatever
name the forward uses (``past_key_values`` up to 5.23, ``cache`` from 5.24).
"""
from __future__ import annotations

import inspect
from typing import Optional, Union

import torch
from torch import nn


def decode(backbone: nn.Module, prompt: torch.Tensor, input_ids: torch.Tensor,
           attention_mask: Optional[torch.Tensor], max_new_tokens: int, do_sample: bool = False,
           temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           eos_token_id: Union[int, list[int], None] = None, pad_token_id: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Greedy or sampled decoding of a causal LM with a soft prompt.

    Step 0 (prefill) feeds ``inputs_embeds = [prompt; emb(input_ids)]`` (B, n+L, d) with the
    mask prefixed by n ones and positions 0..n+L-1; step t >= 1 feeds the last id (B, 1) at
    position n+L+t-1 with the returned cache, so the prompt is computed once.

    Args:
        backbone: a HF causal LM.
        prompt: [n, d] prompt embeddings.
        input_ids: [B, L] ids, left-padded when rows differ in length.
        attention_mask: [B, L] or None (all ones).
        max_new_tokens: the most tokens to add (>= 1).
        do_sample, temperature, top_k, top_p: token choice, as HF's sampling processors
            (temperature, then top-k, then top-p; min 1 token kept).
        eos_token_id: id(s) that end a row; a finished row gets pad_token_id afterwards.
        pad_token_id: filler for finished rows (default: the first EOS id).
        generator: optional RNG for ``torch.multinomial``.
    Returns:
        [B, L + T] ids (T <= max_new_tokens; fewer when every row hit EOS).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0 when sampling")
    b, length = input_ids.shape
    n = prompt.shape[0]
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif bool((attention_mask.sum(dim=1) == 0).any()):
        rows = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} are all padding; every row needs at least one real token")
    elif bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate() needs left padding: some rows have a 0 in the last mask column")
    eos = _as_list(eos_token_id)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long) if eos else None
    if eos and pad_token_id is None:
        pad_token_id = eos[0]
    params = set(inspect.signature(backbone.forward).parameters)
    cache_name = "cache" if "cache" in params else "past_key_values"
    use_positions = "position_ids" in params

    embed = backbone.get_input_embeddings()
    inputs_embeds = embed(input_ids)  # (B, L, d)
    inputs_embeds = torch.cat([prompt.to(inputs_embeds.dtype).expand(b, n, -1), inputs_embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)  # (B, n+L)
    step_inputs = {"inputs_embeds": inputs_embeds}
    positions = torch.arange(n + length, device=device).expand(b, -1)  # plain arange, as peft
    cache = None
    ids = input_ids
    unfinished = torch.ones(b, dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        kwargs = dict(step_inputs, attention_mask=mask, use_cache=True)
        if use_positions:
            kwargs["position_ids"] = positions
        if cache is not None:
            kwargs[cache_name] = cache
        out = backbone(**kwargs)
        cache = out[cache_name]
        logits = out.logits[:, -1].to(dtype=torch.float32)  # (B, V)
        if do_sample:
            probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
            next_ids = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            next_ids = logits.argmax(dim=-1)
        if eos_t is not None:
            next_ids = next_ids * unfinished + pad_token_id * (1 - unfinished)
            unfinished = unfinished & ~torch.isin(next_ids, eos_t)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        if eos_t is not None and int(unfinished.max()) == 0:
            break
        step_inputs = {"input_ids": next_ids[:, None]}  # (B, 1)
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        positions = positions[:, -1:] + 1
    return ids


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """Scale by 1/temperature, keep the top_k largest, then the smallest set with mass >= top_p.

    Args:
        logits: [B, V] fp32.
    Returns:
        [B, V] with removed entries at -inf (at least one entry kept per row).
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1:] = False  # the most likely token always stays
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _as_list(value: Union[int, list[int], torch.Tensor, None]) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
