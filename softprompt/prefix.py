"""PrefixModel: a frozen HF backbone whose attention layers see learned key/value prefixes first.

The prefixes enter as a prefilled KV cache (n_virtual positions per layer), so no input is
changed: logits keep the input's length [B, L, V], labels are not padded, the attention mask
gains n_virtual leading ones and explicit ``position_ids`` shift by n_virtual (the model derives
positions n_virtual.. from the cache length otherwise). The cache keyword is read from the
forward's signature (``past_key_values`` up to transformers 5.23, ``cache`` from 5.24).
"""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call
from transformers.cache_utils import DynamicCache

from softprompt.model import TASKS, _find_head, check_length
from softprompt.prefix_config import PrefixConfig
from softprompt.prefix_encoder import PrefixEncoder, PrefixGeometry, prefix_cache, prefix_geometry

log = logging.getLogger(__name__)

CACHE_NAMES = ("cache", "past_key_values")  # transformers >= 5.24, then <= 5.23
_NO_CHECKPOINTING = ("prefix tuning does not work with gradient checkpointing (a recomputed layer would extend "
                     "the prefix cache a second time); call backbone.gradient_checkpointing_disable()")


def cache_keyword(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes a KV cache."""
    params = inspect.signature(module.forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise ValueError(f"{type(module).__name__}.forward takes no KV cache ({' or '.join(CACHE_NAMES)}); "
                     "prefix tuning needs one")


def _checkpointing_on(backbone: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules())


class PrefixModel(nn.Module):
    """Wraps a frozen backbone; the only trainable tensors are the prefix encoder and, for
    ``task="seq_cls"``, a copy of the classification head (lent to the backbone's forward
    through ``torch.func.functional_call``, as PromptModel does).
    """

    def __init__(self, backbone: nn.Module, config: PrefixConfig, task: str = "causal_lm") -> None:
        """Args:
            backbone: a Hugging Face ``...ForCausalLM`` or ``...ForSequenceClassification`` of a
                supported model type (``softprompt.prefix_encoder.PREFIX_MODEL_TYPES``).
            config: the prefix configuration.
            task: "causal_lm" or "seq_cls".
        Raises:
            ValueError: unsupported architecture or task, or gradient checkpointing switched on
                (a recomputed layer would append its keys to the cache a second time).
        """
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {TASKS}")
        self.geometry: PrefixGeometry = prefix_geometry(backbone)
        if _checkpointing_on(backbone):
            raise ValueError(_NO_CHECKPOINTING)
        self.cache_name = cache_keyword(getattr(backbone, "base_model", backbone))
        self.backbone, self.config, self.task = backbone, config, task
        backbone.requires_grad_(False)
        device = backbone.get_input_embeddings().weight.device
        # the head copy first, then the encoder: the trainable parameters come in peft's order
        # (its wrapped model, then its prompt encoder), so a clipped global grad norm sums alike
        self.head_name: Optional[str] = None
        self.head: Optional[nn.Module] = None
        if task == "seq_cls":
            self.head_name = _find_head(backbone)
            self.head = copy.deepcopy(getattr(backbone, self.head_name)).requires_grad_(True)
        self.prefix_encoder = PrefixEncoder(config.n_virtual, self.geometry, config.projection,
                                            config.encoder_hidden, config.init).to(device)

    def prefix(self) -> torch.Tensor:
        """Returns: the current prefixes [n_virtual, 2 * layers * kv_width], fp32."""
        return self.prefix_encoder()

    def prefix_kv(self, batch_size: int) -> DynamicCache:
        """The prefilled cache for a batch: layer l holds key, value [B, H_kv, n_virtual, D] in the
        backbone's dtype (dropout, if configured, draws one mask per row in training)."""
        flat = self.prefix_encoder(batch_size)  # (B, n, width)
        # cast after the broadcast (peft casts its batched output): the backward sums rows in fp32
        flat = flat.to(self._dtype())
        if self.config.dropout > 0.0 and self.training:
            flat = nn.functional.dropout(flat, self.config.dropout, training=True)
        return prefix_cache(flat, self.geometry)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """What trains: the head copy's parameters (seq_cls), then the prefix encoder's."""
        params = list(self.head.parameters()) if self.head is not None else []
        return params + list(self.prefix_encoder.parameters())

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.backbone.get_output_embeddings()

    def _dtype(self) -> torch.dtype:
        return getattr(self.backbone, "dtype", None) or self.backbone.get_input_embeddings().weight.dtype

    def _prefixed_mask(self, attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, length)}")
        ones = attention_mask.new_ones(batch, self.config.n_virtual)
        return torch.cat([ones, attention_mask], dim=1)  # (B, n + L)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                **kwargs: Any) -> Any:
        """Run the backbone with the prefixes in its cache.

        Args:
            input_ids: [B, L] ids (or ``inputs_embeds`` [B, L, d]).
            attention_mask: [B, L]; n_virtual ones are put in front.
            labels: causal LM [B, L] (unchanged: the prefix has no positions in the output);
                seq_cls [B].
            inputs_embeds: [B, L, d] instead of input_ids.
            position_ids: optional [B, L]; shifted by n_virtual.
            token_type_ids: seq_cls only (kept, as peft does, where the forward takes them);
                dropped with a warning for causal LM, as peft does.
            **kwargs: passed to the backbone (e.g. ``output_hidden_states``); a cache is refused.
        Returns:
            the backbone's output: causal-LM logits [B, L, V], classification logits [B, C].
        """
        for name in CACHE_NAMES:
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}= is not accepted: the prefix is the cache; use generate() to decode")
        if self.training and _checkpointing_on(self.backbone):
            raise ValueError(_NO_CHECKPOINTING)
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("give input_ids or inputs_embeds")
        batch, length = ref.shape[:2]
        check_length(self.backbone, self.config.n_virtual + length)
        if attention_mask is not None:
            kwargs["attention_mask"] = self._prefixed_mask(attention_mask, batch, length)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids + self.config.n_virtual
        if token_type_ids is not None:
            if self.task == "causal_lm":
                log.warning("token_type_ids are ignored for causal LM prefix tuning")
            elif "token_type_ids" in inspect.signature(self.backbone.forward).parameters:
                kwargs["token_type_ids"] = token_type_ids
        kwargs.update(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels)
        kwargs[self.cache_name] = self.prefix_kv(batch)
        if self.head is None:
            return self.backbone(**kwargs)
        lent = {f"{self.head_name}.{k}": v for k, v in self.head.state_dict(keep_vars=True).items()}
        return functional_call(self.backbone, lent, args=(), kwargs=kwargs, strict=False)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Hugging Face ``generate`` on the backbone, the prefixes prefilled in its cache.

        The mask gains n_virtual leading ones, so HF's mask-derived positions put the first real
        token at n_virtual (left padding works as in HF); each later step reuses the cache.

        Args:
            input_ids: [B, L]; pad a batch on the LEFT and give ``attention_mask``.
            attention_mask: [B, L] (default all ones).
            **generate_kwargs: HF generation options (max_new_tokens, do_sample, num_beams, ...).
        Returns:
            [B * num_return_sequences, L + T] ids: the input ids then the new ids.
        """
        if self.task != "causal_lm":
            raise ValueError(f"generate() needs task='causal_lm', this model has task={self.task!r}")
        for name in (*CACHE_NAMES, "position_ids", "inputs_embeds"):
            if generate_kwargs.get(name) is not None:
                raise ValueError(f"generate() builds {name} itself; do not pass it")
        batch, length = input_ids.shape
        gen_cfg = getattr(self.backbone, "generation_config", None)
        new = generate_kwargs.get("max_new_tokens", getattr(gen_cfg, "max_new_tokens", None)) or 0
        check_length(self.backbone, self.config.n_virtual + length + int(new))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # HF repeats each row max(num_beams, num_return_sequences) times before the first step
        copies = max(int(generate_kwargs.get(name) or getattr(gen_cfg, name, None) or 1)
                     for name in ("num_beams", "num_return_sequences"))
        mask = self._prefixed_mask(attention_mask, batch, length)
        generate_kwargs[self.cache_name] = self.prefix_kv(batch * copies)
        return self.backbone.generate(input_ids=input_ids, attention_mask=mask, **generate_kwargs)
