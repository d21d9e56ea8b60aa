"""PromptModel: a frozen HF backbone plus a soft prompt, for causal LM, classification, generation."""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call

from softprompt.config import PromptConfig
from softprompt.encoder import PromptEncoder
from softprompt.generate import PromptInjection, generate_with_prompt, planned_length
from softprompt.inject import prepend_prompt
from softprompt.prompt import SoftPrompt, fit_ids

log = logging.getLogger(__name__)

TASKS = ("causal_lm", "seq_cls")
HEAD_NAMES = ("classifier", "score")  # the classification heads peft copies (modules_to_save)


class PromptModel(nn.Module):
    """Wraps a frozen backbone; the only trainable tensors are the prompt (or its encoder) and,
    for ``task="seq_cls"``, a copy of the classification head.

    The backbone is never changed beyond ``requires_grad_(False)``: no module is replaced and no
    method is patched. The head copy enters the backbone's own forward through
    ``torch.func.functional_call``, which lends it the copy's tensors for that call only.
    """

    def __init__(self, backbone: nn.Module, config: PromptConfig, tokenizer: Any = None,
                 task: str = "causal_lm", init_weights: bool = True) -> None:
        """Args:
            backbone: a Hugging Face ``PreTrainedModel`` (``...ForCausalLM`` or
                ``...ForSequenceClassification``).
            config: the prompt configuration.
            tokenizer: needed only for ``init="text"``.
            task: "causal_lm" or "seq_cls".
            init_weights: False skips the text/vocab/ids init (used when loading saved weights).
        """
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {TASKS}")
        self.backbone = backbone
        self.config = config
        self.task = task
        # recorded for peft's adapter_config.json (peft wants a tokenizer path for text inits)
        self.tokenizer_name_or_path: Optional[str] = getattr(tokenizer, "name_or_path", None) or None
        backbone.requires_grad_(False)
        embedding = backbone.get_input_embeddings()
        self.dim = int(embedding.weight.shape[1])
        # the head copy first, then the prompt: the trainable parameters come in peft's order
        # (its wrapped model, then its prompt encoder), so a clipped global grad norm sums alike
        self.head_name: Optional[str] = None
        self.head: Optional[nn.Module] = None
        if task == "seq_cls":
            self.head_name = _find_head(backbone)
            self.head = copy.deepcopy(getattr(backbone, self.head_name)).requires_grad_(True)
        if config.method == "prompt":
            self.prompt_encoder: nn.Module = SoftPrompt(config.n_virtual, self.dim)
        else:
            mlp_layers = config.encoder_num_layers if config.honour_mlp_options else None
            self.prompt_encoder = PromptEncoder(config.n_virtual, self.dim, config.encoder, config.encoder_hidden,
                                                config.encoder_num_layers, config.encoder_dropout, mlp_layers)
        if init_weights:
            self._init_table(embedding, tokenizer)
        self.prompt_encoder.to(embedding.weight.device)

    @property
    def table(self) -> SoftPrompt:
        """The [n_virtual, d] table (the prompt itself, or the encoder's input)."""
        enc = self.prompt_encoder
        return enc if isinstance(enc, SoftPrompt) else enc.embedding

    def _init_table(self, embedding: nn.Module, tokenizer: Any) -> None:
        cfg = self.config
        if cfg.init == "text":
            self.table.init_from_text(embedding, tokenizer, cfg.init_text, cfg.truncate_init_text)
        elif cfg.init == "vocab":
            self.table.init_from_vocab(embedding)
        elif cfg.init == "ids":
            vocab = embedding.weight.shape[0]
            if max(cfg.init_ids) >= vocab:
                raise ValueError(f"init_ids contain {max(cfg.init_ids)}; expected ids < vocab size {vocab}")
            self.table.init_from_ids(embedding, fit_ids(cfg.init_ids, cfg.n_virtual, cfg.truncate_init_text,
                                                        "init_ids"))

    def prompt(self) -> torch.Tensor:
        """Returns: the current prompt, [n_virtual, d] fp32 (the encoder output for P-Tuning)."""
        return self.prompt_encoder()

    def adapter_parameters(self) -> list[nn.Parameter]:
        """What trains: the head copy's parameters (seq_cls), then the prompt (or encoder) parameters."""
        params = list(self.head.parameters()) if self.head is not None else []
        return params + list(self.prompt_encoder.parameters())

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        """Run the backbone on [prompt; input].

        Args:
            input_ids: [B, L] token ids (or give ``inputs_embeds`` [B, L, d]).
            attention_mask: [B, L]; decoder classifiers need LEFT padding (their head reads the
                last position).
            labels: causal LM [B, L] (prompt columns become -100); seq_cls [B].
            token_type_ids: [B, L]; prompt columns are 0. Passed on only to backbones whose
                forward names it.
            **kwargs: passed to the backbone; ``position_ids`` is dropped (positions are
                0..n_virtual+L-1, virtual tokens first, as in peft).
        Returns:
            the backbone's output; causal-LM logits are [B, n_virtual + L, V] (virtual positions
            first, as in peft), classification logits [B, num_labels].
        """
        if kwargs.pop("position_ids", None) is not None:
            log.warning("position_ids are ignored: positions are 0..n_virtual+L-1 with the prompt first")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, L, d)
        length = inputs_embeds.shape[1]
        check_length(self.backbone, self.config.n_virtual + length)
        if token_type_ids is not None and "token_type_ids" not in _forward_params(self.backbone):
            token_type_ids = None
        insert_at = 1 if (self.task == "seq_cls" and self.config.pool == "real_cls") else 0
        # the padding check reads a tensor value: skip it while compiling (it would break the graph)
        if self.task == "seq_cls" and insert_at == 0 and attention_mask is not None and \
                _is_decoder_head(self.backbone) and not torch.compiler.is_compiling() and \
                not bool(attention_mask[:, -1].all()):
            raise ValueError("a decoder classifier reads the last position, and this batch is right-padded "
                             "(attention_mask has 0 in its last column): its head would pool a pad position; "
                             "pad on the left")
        batch = prepend_prompt(self.prompt(), inputs_embeds, attention_mask, labels, token_type_ids, insert_at)
        kwargs.update(batch)
        if self.head is None:
            return self.backbone(**kwargs)
        lent = {f"{self.head_name}.{k}": v for k, v in self.head.state_dict(keep_vars=True).items()}
        return functional_call(self.backbone, lent, args=(), kwargs=kwargs, strict=False)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 **kwargs: Any) -> Any:
        """Hugging Face ``generate`` on the backbone, the prompt entering once at prefill.

        Args:
            input_ids: [B, L]; pad a batch on the LEFT and give ``attention_mask``.
            attention_mask: [B, L] (default: generate's own).
            **kwargs: anything the backbone's ``generate`` takes (``max_new_tokens``,
                ``do_sample``, ``num_beams``, ``repetition_penalty``, ``stopping_criteria``,
                ``streamer``, ``generation_config``, ``eos_token_id``, ``output_scores``...),
                with Hugging Face's meaning and defaults.
        Returns:
            what ``generate`` returns: [B, L + T] ids (the input ids, then the new ones; no
            virtual tokens), or a ``GenerateOutput`` with ``return_dict_in_generate=True``.
        """
        if self.task != "causal_lm":
            raise ValueError(f"generate() needs task='causal_lm', this model has task={self.task!r}")
        check_length(self.backbone, planned_length(self.backbone, self.config.n_virtual, input_ids.shape[1],
                                                   kwargs))
        injection = PromptInjection(self.prompt(), self.backbone.get_input_embeddings())
        return generate_with_prompt(self.backbone, injection, input_ids, attention_mask, **kwargs)


def max_positions(backbone: nn.Module) -> Optional[int]:
    """The longest sequence the backbone's position table allows, or None (e.g. ALiBi)."""
    cfg = getattr(backbone, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(backbone: nn.Module, total: int) -> None:
    """Raise if prompt + input (+ new tokens) exceed the backbone's positions."""
    limit = max_positions(backbone)
    if limit is not None and total > limit:
        raise ValueError(f"n_virtual + sequence length = {total} exceeds the model's maximum of {limit} "
                         "positions; shorten the input or use fewer virtual tokens")


def _find_head(backbone: nn.Module) -> str:
    for name, _ in backbone.named_children():
        if any(h in name for h in HEAD_NAMES):
            return name
    names = [n for n, _ in backbone.named_children()]
    raise ValueError(f"task='seq_cls' needs a child module named like {HEAD_NAMES}; found {names}")


def _is_decoder_head(backbone: nn.Module) -> bool:
    return not hasattr(getattr(backbone, "base_model", None), "pooler")


def _forward_params(backbone: nn.Module) -> set[str]:
    return set(inspect.signature(backbone.forward).parameters)
