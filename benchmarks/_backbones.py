"""Backbones, batches and adapters (ours and peft's) shared by the benchmark scripts.

Backbones are the bundled pretrained models (through `train.models`) when their packages are
installed, else random models built from a config of the same shape, so every script runs on
any machine; the header of each table says which one was used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import transformers

import _common  # noqa: F401  (puts the repository root on sys.path)

# bundled name -> task, (batch, seq), LoRA targets, modules never quantized, fallback config
BACKBONES = {
    "minilm": dict(task="seq_cls", shape=(16, 64), targets=["query", "value"],
                   skip=("classifier",)),
    "smollm2": dict(task="causal_lm", shape=(4, 128), targets=["q_proj", "v_proj"],
                    skip=("lm_head",)),
    # tiny configs for --quick runs (seconds, not minutes)
    "tiny-bert": dict(task="seq_cls", shape=(4, 32), targets=["query", "value"],
                      skip=("classifier",)),
    "tiny-llama": dict(task="causal_lm", shape=(2, 32), targets=["q_proj", "v_proj"],
                       skip=("lm_head",)),
}
PROMPT_METHODS = ("prompt", "ptuning-mlp", "ptuning-lstm")
LORA_METHODS = ("lora", "dora", "qlora")
METHODS = PROMPT_METHODS + LORA_METHODS + ("ia3",)  # ia3: the registry's default targets


def _fallback_config(name: str) -> transformers.PretrainedConfig:
    """A config with the bundled model's shape (or a tiny one for the quick runs)."""
    if name == "minilm":  # all-MiniLM-L6-v2
        return transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                       num_attention_heads=12, intermediate_size=1536,
                                       num_labels=2)
    if name == "smollm2":  # SmolLM2-135M
        return transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9,
                                        num_key_value_heads=3, tie_word_embeddings=True,
                                        max_position_embeddings=2048, pad_token_id=2,
                                        bos_token_id=1, eos_token_id=2)
    if name == "tiny-bert":
        return transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=128,
                                       num_labels=2)
    if name == "tiny-llama":
        return transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=256,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise ValueError(f"backbone {name!r}; expected one of {sorted(BACKBONES)}")


@dataclass
class Backbone:
    name: str
    task: str                 # "seq_cls" | "causal_lm"
    model: torch.nn.Module    # a pristine fp32 copy: deep-copy it for every candidate
    source: str               # "bundled pretrained" or "random, config of the same shape"
    vocab: int
    batch: int
    seq: int
    targets: list
    skip: tuple

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)


def load(name: str, batch: int | None = None, seq: int | None = None,
         bundled: bool = True) -> Backbone:
    """The named backbone (bundled weights when available, else the same shape at random)."""
    spec = BACKBONES[name]
    model, source = None, ("tiny random config" if name.startswith("tiny")
                           else "random weights, config of the same shape")
    if bundled and name in ("minilm", "smollm2"):
        try:
            from train.models import load_backbone, resolve_model
            model = load_backbone(resolve_model(name), spec["task"])
            source = "bundled pretrained weights"
        except (ImportError, FileNotFoundError, OSError, ValueError) as exc:
            source += f" (bundled model unavailable: {type(exc).__name__})"
    if model is None:
        torch.manual_seed(0)
        config = _fallback_config(name)
        auto = (transformers.AutoModelForSequenceClassification if spec["task"] == "seq_cls"
                else transformers.AutoModelForCausalLM)
        model = auto.from_config(config)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    b, s = spec["shape"]
    return Backbone(name, spec["task"], model, source, model.config.vocab_size,
                    batch or b, seq or s, list(spec["targets"]), spec["skip"])


def make_batch(bb: Backbone, seed: int = 0, device: str | torch.device = "cpu",
               answer: int | None = None) -> dict:
    """A fixed random batch: ids (B, T), mask ones (B, T), labels (B,) or (B, T).

    answer: causal LM only; None labels every token, N labels only the last N of each row
    (instruction shaped: the prompt's labels are -100).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, bb.vocab, (bb.batch, bb.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if bb.task == "seq_cls":
        batch["labels"] = torch.randint(0, 2, (bb.batch,), generator=gen)
    else:
        batch["labels"] = ids.clone()
        if answer is not None:
            batch["labels"][:, :bb.seq - answer] = -100
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------ adapters: ours
def ours(bb: Backbone, method: str, n_virtual: int = 20, r: int = 8,
         device: str | torch.device = "cpu") -> torch.nn.Module:
    """Our adapter of `method` on a fresh copy of the backbone, moved to `device`."""
    model = bb.fresh()
    if method in PROMPT_METHODS:
        from softprompt import PromptConfig, PromptModel
        kind, _, enc = method.partition("-")
        cfg = (PromptConfig(method="prompt", n_virtual=n_virtual) if kind == "prompt" else
               PromptConfig(method="ptuning", n_virtual=n_virtual, encoder=enc))
        return PromptModel(model, cfg, task=bb.task).to(device)
    from lora import LoRAConfig, add_lora
    if method == "ia3":
        from lora import IA3Config, add_ia3
        return add_ia3(model, IA3Config()).to(device)
    if method == "qlora":
        from lora import quantize_model
        quantize_model(model, skip=bb.skip, blocksize=64, double_quant=True,
                       compute_dtype=torch.float32)
    cfg = LoRAConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=bb.targets,
                     use_dora=method == "dora")
    return add_lora(model, cfg).to(device)


# ------------------------------------------------------------------------------ adapters: peft
def bnb_quantize(model: torch.nn.Module, skip: tuple,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """Swap every nn.Linear (except `skip` names) for a bitsandbytes NF4 Linear4bit, in place."""
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear
             and n.split(".")[-1] not in skip]
    with torch.random.fork_rng(devices=[]):  # Linear4bit draws a throw-away init: keep the caller's RNG
        _swap_in_linear4bit(model, names, device)
    model.is_loaded_in_4bit = True  # how peft learns to dispatch its bnb LoRA layer
    return model


def _swap_in_linear4bit(model: torch.nn.Module, names: list, device) -> None:
    import bitsandbytes as bnb
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4", blocksize=64)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight at the first eval-mode forward
        # for a bf16 inference kernel and keeps it repacked: a later training step then fails
        # ("a view of a leaf Variable ... in-place") and eval outputs come from another kernel.
        # The reference stays on its one documented path for training and scoring alike.
        q.support_avx512bf16_for_cpu = False
        setattr(parent, child, q.to(device))  # .to() of a fresh Params4bit quantizes it


def reference(bb: Backbone, method: str, n_virtual: int = 20, r: int = 8,
              device: str | torch.device = "cpu") -> torch.nn.Module:
    """peft's adapter of `method` on a fresh copy of the backbone, moved to `device`."""
    import peft
    model = bb.fresh()
    task = peft.TaskType.SEQ_CLS if bb.task == "seq_cls" else peft.TaskType.CAUSAL_LM
    if method == "prompt":
        cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n_virtual)
    elif method.startswith("ptuning"):
        enc = (peft.PromptEncoderReparameterizationType.MLP if method.endswith("mlp")
               else peft.PromptEncoderReparameterizationType.LSTM)
        cfg = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n_virtual,
                                       encoder_reparameterization_type=enc,
                                       encoder_hidden_size=model.config.hidden_size)
    elif method == "ia3":  # no task_type, as for LoRA below
        cfg = peft.IA3Config()
    else:
        if method == "qlora":
            bnb_quantize(model, bb.skip, device)
        # no task_type: a SEQ_CLS task would also train a copy of the head (modules_to_save),
        # which ours does not do by default
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                              target_modules=bb.targets, use_dora=method == "dora")
    return peft.get_peft_model(model.to(device), cfg)


def builders(bb: Backbone, method: str, **kw) -> dict[str, Callable[[], torch.nn.Module]]:
    return {"ours": lambda: ours(bb, method, **kw), "peft": lambda: reference(bb, method, **kw)}


# ------------------------------------------------------------------------------ training step
def train_step(model: torch.nn.Module, batch: dict, amp: torch.dtype | None,
               lr: float = 1e-4, loss_fn: Callable | None = None) -> Callable[[], None]:
    """One optimizer step (forward, backward, AdamW, zero_grad) as a closure.

    Args:
        model: an adapted model; its parameters with requires_grad are what trains.
        batch: keyword arguments of the forward (labels included).
        amp: None for fp32, else the autocast dtype (torch.bfloat16 on CPU).
        loss_fn: (model, batch) -> loss; default the model's own ``forward(**batch).loss``.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    device_type = next(model.parameters()).device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fixed_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, seq) >= 3 (clear of pad/bos/eos) from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)
