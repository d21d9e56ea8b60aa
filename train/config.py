"""Frozen configs of a training run; the CLI's flags are generated from their fields.

Three groups, with field names unique across them so each is one ``--flag``:
``ModelConfig`` (which backbone, which adaptation method and its knobs), ``DataConfig`` (what to
read and how to encode it) and ``LoopConfig`` (the optimizer loop).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["METHODS", "PRECISIONS", "SCHEDULES", "ModelConfig", "DataConfig", "LoopConfig",
           "RunConfig", "default_lr"]

METHODS = ("prompt", "ptuning", "lora", "qlora", "head")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
LOGS = ("jsonl", "tensorboard")
TASKS = ("auto", "classify", "instruct")

# Learning rates that suit each method on the bundled data (prompts need a much larger step
# than weights; these follow the usual published settings for each method).
_DEFAULT_LR = {"head": 1e-2, "prompt": 3e-2, "ptuning": 1e-2, "lora": 5e-4, "qlora": 5e-4}


def default_lr(method: str) -> float:
    """The learning rate used when ``--lr`` is not given."""
    return _DEFAULT_LR[method]


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    method: str = "lora"            # prompt | ptuning | lora | qlora | head (classifier head only)
    model: str = "minilm"           # bundled name (minilm, smollm2), a local Hugging Face folder or a cached hub id (org/name)
    base_dtype: str = "fp32"        # dtype of the frozen base weights: fp32 | bf16 | fp16 (adapters stay fp32)
    n_virtual: int = 20             # prompt / ptuning: number of virtual tokens
    prompt_init: str = "random"     # prompt: random | text | vocab
    prompt_init_text: str = ""      # prompt with prompt_init=text: the text whose embeddings seed the table
    encoder: str = "mlp"            # ptuning: mlp | lstm reparameterization
    encoder_hidden: int = 0         # ptuning: encoder width; 0 means the model's hidden size
    prompt_pool: str = "backbone"   # prompt / ptuning classifiers: backbone (peft: pools the first virtual token) | real_cls
    lora_r: int = 8                 # lora / qlora: rank
    lora_alpha: float = 8.0         # lora / qlora: scaling numerator (scaling = alpha / r)
    lora_dropout: float = 0.0       # lora / qlora: dropout on the adapter input
    target_modules: tuple = ()      # lora / qlora: module names; empty -> the registry default

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method={self.method!r}; expected one of {METHODS}")
        _check(bool(self.model), "model is empty; expected a bundled name or a folder")
        _check(self.base_dtype in PRECISIONS, f"base_dtype={self.base_dtype!r}; expected one of {PRECISIONS}")
        _check(self.n_virtual > 0, f"n_virtual={self.n_virtual}; expected > 0")
        _check(self.prompt_init in ("random", "text", "vocab"),
               f"prompt_init={self.prompt_init!r}; expected random, text or vocab")
        _check(self.prompt_init != "text" or bool(self.prompt_init_text),
               "prompt_init='text' needs a non-empty prompt_init_text")
        _check(self.encoder in ("mlp", "lstm"), f"encoder={self.encoder!r}; expected mlp or lstm")
        _check(self.prompt_pool in ("backbone", "real_cls"),
               f"prompt_pool={self.prompt_pool!r}; expected backbone or real_cls")
        _check(self.encoder_hidden >= 0, f"encoder_hidden={self.encoder_hidden}; expected >= 0")
        _check(self.lora_r > 0, f"lora_r={self.lora_r}; expected > 0")
        _check(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha}; expected > 0")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout}; expected in [0, 1)")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True)
class DataConfig:
    data: str = "rotten_tomatoes"   # bundled name or a .csv (text,label) / .json / .jsonl (instruction,input,output) file
    task: str = "auto"              # classify (head on text) | instruct (causal LM on the chat template) | auto
    max_length: int = 256           # tokens per example, prompt and answer together; longer ones are truncated
    padding_side: str = "right"     # right | left padding in the collator
    instruction: str = "Is the sentiment of this review positive or negative?"  # CSV -> instruct records
    label_words: tuple = ("negative", "positive")  # CSV -> instruct: answer word of label 0, 1, ...
    num_labels: int = 2             # classify: labels must lie in [0, num_labels)
    eval_fraction: float = 0.2      # held-out share when the file has no ``split`` column
    max_train: int = 0              # use at most this many training examples (0 = all)
    max_eval: int = 0               # evaluate on at most this many held-out examples (0 = all)

    def __post_init__(self) -> None:
        _check(bool(self.data), "data is empty; expected a bundled name or a file path")
        _check(self.task in TASKS, f"task={self.task!r}; expected one of {TASKS}")
        _check(self.max_length > 1, f"max_length={self.max_length}; expected > 1")
        _check(self.padding_side in ("right", "left"),
               f"padding_side={self.padding_side!r}; expected right or left")
        _check(self.num_labels >= 2, f"num_labels={self.num_labels}; expected >= 2")
        object.__setattr__(self, "label_words", tuple(self.label_words))
        _check(len(self.label_words) == self.num_labels,
               f"label_words={self.label_words}; expected {self.num_labels} words (num_labels)")
        _check(0.0 < self.eval_fraction < 1.0, f"eval_fraction={self.eval_fraction}; expected in (0, 1)")
        _check(self.max_train >= 0, f"max_train={self.max_train}; expected >= 0")
        _check(self.max_eval >= 0, f"max_eval={self.max_eval}; expected >= 0")


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 400                # optimizer steps
    batch_size: int = 16            # examples per micro-batch (per process under torchrun)
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: Optional[float] = None      # peak learning rate; None means the method's default
    weight_decay: float = 0.0       # AdamW decoupled weight decay
    warmup_steps: int = 0           # linear warm-up from 0 to lr over these steps
    schedule: str = "linear"        # linear | cosine | constant decay after warm-up
    precision: str = "fp32"         # fp32 | bf16 | fp16 autocast (fp16 adds a GradScaler)
    max_grad_norm: float = 1.0      # clip the global grad norm (after unscaling); 0 disables
    eval_every: int = 0             # evaluate every N steps (0: only before and after)
    save_every: int = 0             # checkpoint every N steps (0: only at the end)
    log_every: int = 10             # metrics line every N steps
    seed: int = 0                   # seeds torch, python and the data order
    grad_checkpointing: bool = False  # recompute activations in backward (frozen base safe)
    device: str = "auto"            # auto (cuda if available) | cpu | cuda | cuda:N
    progress: bool = True           # show a tqdm progress bar on rank 0
    compile: bool = False           # run the model's forward through torch.compile (same numbers, to fp32 rounding)
    log: str = "jsonl"              # jsonl (metrics.jsonl) | tensorboard (also TensorBoard events in tensorboard/)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"{name}={value!r}; expected an integer > 0")
        _check(self.lr is None or (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)),
               f"lr={self.lr}; expected a positive finite learning rate (or None for the method's default)")
        _check(self.weight_decay >= 0, f"weight_decay={self.weight_decay}; expected >= 0")
        _check(0 <= self.warmup_steps <= self.steps,
               f"warmup_steps={self.warmup_steps}; expected in [0, steps={self.steps}]")
        _check(self.schedule in SCHEDULES, f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
        _check(self.precision in PRECISIONS, f"precision={self.precision!r}; expected one of {PRECISIONS}")
        _check(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm}; expected >= 0")
        _check(self.eval_every >= 0, f"eval_every={self.eval_every}; expected >= 0")
        _check(self.save_every >= 0, f"save_every={self.save_every}; expected >= 0")
        _check(self.log in LOGS, f"log={self.log!r}; expected one of {LOGS}")
        _check(self.log != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
               "log='tensorboard' needs the tensorboard package: pip install tensorboard (or purepeft[log])")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"device={self.device!r}; expected auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)

    @property
    def lr(self) -> float:
        """The effective learning rate (``loop.lr`` or the method's default)."""
        return self.loop.lr or default_lr(self.model.method)

    def to_dict(self) -> dict:
        """A JSON-ready dict ``{"model": {...}, "data": {...}, "loop": {...}}``."""
        return {name: _jsonable(dataclasses.asdict(getattr(self, name))) for name in ("model", "data", "loop")}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Build from ``to_dict`` output; unknown groups or fields raise a ValueError naming them."""
        unknown = set(d) - {"model", "data", "loop"}
        _check(not unknown, f"unknown config section(s) {sorted(unknown)}; expected model, data, loop")
        parts = {}
        for name, klass in (("model", ModelConfig), ("data", DataConfig), ("loop", LoopConfig)):
            section = d.get(name, {})
            fields = {f.name for f in dataclasses.fields(klass)}
            bad = set(section) - fields
            _check(not bad, f"unknown field(s) {sorted(bad)} in section {name!r}; expected some of {sorted(fields)}")
            parts[name] = klass(**section)
        return cls(**parts)


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
