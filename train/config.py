"""Frozen configs of a training run; the CLI's flags are generated from their fields.

Three groups, with field names unique across them so each is one ``--flag``:
``ModelConfig`` (which backbone, which adaptation method and its knobs), ``DataConfig`` (what to
read and how to encode it) and ``LoopConfig`` (the optimizer loop).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass
from typing import Optional

from .memory import RELEASE_MODES

__all__ = ["METHODS", "PRECISIONS", "SCHEDULES", "ModelConfig", "DataConfig", "LoopConfig",
           "RunConfig", "default_lr"]

METHODS = ("prompt", "ptuning", "prefix", "lora", "qlora", "ia3", "bottleneck", "head")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
DISTRIBUTED = ("ddp", "fsdp2")  # multi-process strategies (train.distributed.STRATEGIES)
LOGS = ("jsonl", "tensorboard")
TASKS = ("auto", "classify", "instruct")
TEMPLATES = ("auto", "chat", "seed", "none")  # train.templates.TEMPLATES

# Learning rates that suit each method on the bundled data (prompts need a much larger step
# than weights; these follow the usual published settings for each method).
_DEFAULT_LR = {"head": 1e-2, "prompt": 3e-2, "ptuning": 1e-2, "prefix": 1e-2, "lora": 5e-4, "qlora": 5e-4, "ia3": 1e-2, "bottleneck": 1e-3}
NF4_COMPUTE_DTYPES = ("auto", "fp32", "bf16", "fp16")
BIAS_MODES = ("none", "all", "lora_only")


def default_lr(method: str) -> float:
    """The learning rate used when ``--lr`` is not given."""
    return _DEFAULT_LR[method]


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


# a field's annotation -> the Python (JSON) types its value may have; bool is never an int here
_KINDS = {"str": ((str,), "a string"), "int": ((int,), "an integer"), "float": ((int, float), "a number"),
          "bool": ((bool,), "true or false"), "tuple": ((tuple, list), "a list of strings"),
          "Optional[float]": ((int, float, type(None)), "a number or null")}


# list fields whose entries are not all strings
_ITEM_KINDS = {"layers_to_transform": (str, int), "rank_pattern": (str, list), "alpha_pattern": (str, list)}


def _check_types(obj) -> None:
    """Reject a value of the wrong type (e.g. ``lora_r="8"`` from a JSON file), naming the field."""
    for f in dataclasses.fields(obj):
        kind = _KINDS.get(str(f.type))
        if kind is None:
            continue
        allowed, text = kind
        value = getattr(obj, f.name)
        ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
        if ok and allowed == (tuple, list):  # names; layer indices; [regex, value] pairs
            items = _ITEM_KINDS.get(f.name, (str,))
            ok = all(isinstance(v, items) and not isinstance(v, bool) for v in value)
        _check(ok, f"{f.name}={value!r} ({type(value).__name__}); expected {text}")


# method-specific fields -> the methods that read them; a changed value under another method
# would be silently ignored, so it is an error
_USED_BY = {
    "n_virtual": ("prompt", "ptuning", "prefix"), "prompt_init": ("prompt", "ptuning"),
    "prompt_init_text": ("prompt", "ptuning"), "prompt_pool": ("prompt", "ptuning"),
    "encoder": ("ptuning",), "encoder_hidden": ("ptuning", "prefix"), "prefix_projection": ("prefix",),
    "lora_r": ("lora", "qlora"), "lora_alpha": ("lora", "qlora"), "lora_dropout": ("lora", "qlora"),
    "use_rslora": ("lora", "qlora"), "use_dora": ("lora", "qlora"), "train_bias": ("lora", "qlora"),
    "rank_pattern": ("lora", "qlora"), "alpha_pattern": ("lora", "qlora"),
    "layers_to_transform": ("lora", "qlora"), "layers_pattern": ("lora", "qlora"),
    "target_modules": ("lora", "qlora", "ia3"), "modules_to_save": ("lora", "qlora", "ia3"),
    "feedforward_modules": ("ia3",),
    "nf4_blocksize": ("qlora",), "nf4_double_quant": ("qlora",), "nf4_compute_dtype": ("qlora",),
    "nf4_skip": ("qlora",), "nf4_quant_type": ("qlora",),
    "adapter_config": ("bottleneck",), "reduction_factor": ("bottleneck",), "non_linearity": ("bottleneck",),
}


def _check_used(cfg) -> None:
    for f in dataclasses.fields(cfg):
        users = _USED_BY.get(f.name)
        value = getattr(cfg, f.name)
        if users and cfg.method not in users and value != f.default:
            raise ValueError(f"{f.name}={value!r} is only used by method {' or '.join(users)}; method "
                             f"{cfg.method!r} would ignore it (drop the option or change the method)")


@dataclass(frozen=True)
class ModelConfig:
    method: str = "lora"            # prompt | ptuning | prefix | lora | qlora | ia3 | bottleneck | head (classifier head only)
    model: str = "minilm"           # bundled name (minilm, smollm2), a local Hugging Face folder or a cached hub id (org/name)
    base_dtype: str = "fp32"        # dtype of the frozen base weights: fp32 | bf16 | fp16 (adapters stay fp32)
    n_virtual: int = 20             # prompt / ptuning / prefix: number of virtual tokens
    prompt_init: str = "random"     # prompt / ptuning: random | text | vocab (ptuning: the encoder's input table)
    prompt_init_text: str = ""      # prompt_init=text: the text whose embeddings seed the table
    encoder: str = "mlp"            # ptuning: mlp | lstm reparameterization
    encoder_hidden: int = 0         # ptuning, prefix with projection: encoder width; 0 = hidden size (prefix: kv width)
    prefix_projection: bool = False  # prefix: reparameterize the prefixes through an MLP (peft: prefix_projection)
    prompt_pool: str = "backbone"   # prompt / ptuning classifiers: backbone (peft: pools the first virtual token) | real_cls
    lora_r: int = 8                 # lora / qlora: rank
    lora_alpha: float = 8.0         # lora / qlora: scaling numerator (scaling = alpha / r)
    lora_dropout: float = 0.0       # lora / qlora: dropout on the adapter input
    target_modules: tuple = ()      # lora / qlora / ia3: module names, all-linear or one regex; empty -> registry
    use_rslora: bool = False        # lora / qlora: scaling alpha / sqrt(r) (rank-stabilized LoRA)
    use_dora: bool = False          # lora / qlora: weight-decomposed LoRA (a trainable magnitude per output row)
    train_bias: str = "none"        # lora / qlora: which biases train: none | all | lora_only (peft: bias)
    rank_pattern: tuple = ()        # lora / qlora: per-module ranks as REGEX=R entries, e.g. v_proj=4
    alpha_pattern: tuple = ()       # lora / qlora: per-module alphas as REGEX=ALPHA entries
    layers_to_transform: tuple = ()  # lora / qlora: only these layer indices get adapters; empty -> all
    layers_pattern: str = ""        # lora / qlora: name of the layer list read by layers_to_transform, e.g. layers
    modules_to_save: tuple = ()     # lora / qlora / ia3: extra modules trained in full (besides the classifier head)
    feedforward_modules: tuple = ()  # ia3: targets whose input (not output) is scaled; empty -> the registry
    nf4_blocksize: int = 64         # qlora: weights per absmax block of the 4-bit base
    nf4_double_quant: bool = True   # qlora: quantize the absmax constants too (8-bit, blocks of 256)
    nf4_compute_dtype: str = "auto"  # qlora: matmul dtype of the 4-bit layers: auto (base dtype) | fp32 | bf16 | fp16
    nf4_skip: tuple = ()            # qlora: modules left dense; empty -> the classifier head, or lm_head
    nf4_quant_type: str = "nf4"     # qlora: 4-bit code book: nf4 (QLoRA's NormalFloat) | fp4
    adapter_config: str = "pfeiffer"  # bottleneck: pfeiffer (after the feed-forward block) | houlsby (+ after attention)
    reduction_factor: float = 16.0  # bottleneck: bottleneck width = hidden_size // reduction_factor
    non_linearity: str = ""         # bottleneck: activation (relu, swish, gelu, ...); empty -> the preset's

    def __post_init__(self) -> None:
        _check_types(self)
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
        _check(self.prompt_init == "text" or not self.prompt_init_text,
               f"prompt_init_text={self.prompt_init_text!r} is only used with prompt_init='text', "
               f"got prompt_init={self.prompt_init!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check(self.train_bias in BIAS_MODES, f"train_bias={self.train_bias!r}; expected one of {BIAS_MODES}")
        for name in ("rank_pattern", "alpha_pattern"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            pattern_dict(self, name)  # names a malformed entry
        layers = []
        for item in self.layers_to_transform:
            try:
                layers.append(int(item))
            except (TypeError, ValueError):
                raise ValueError(f"layers_to_transform entry {item!r}; expected layer indices (ints >= 0)") from None
            _check(layers[-1] >= 0, f"layers_to_transform entry {item!r}; expected an int >= 0")
        object.__setattr__(self, "layers_to_transform", tuple(layers))
        _check(not self.layers_pattern or bool(layers),
               f"layers_pattern={self.layers_pattern!r} needs layers_to_transform")
        for name in ("modules_to_save", "feedforward_modules", "nf4_skip"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(self.nf4_blocksize in (64, 128, 256, 512, 1024, 2048, 4096),
               f"nf4_blocksize={self.nf4_blocksize}; expected a power of two in [64, 4096]")
        _check(self.nf4_quant_type in ("nf4", "fp4"), f"nf4_quant_type={self.nf4_quant_type!r}; expected nf4 or fp4")
        _check(self.nf4_compute_dtype in NF4_COMPUTE_DTYPES,
               f"nf4_compute_dtype={self.nf4_compute_dtype!r}; expected one of {NF4_COMPUTE_DTYPES}")
        _check(self.adapter_config in ("pfeiffer", "houlsby"),
               f"adapter_config={self.adapter_config!r}; expected pfeiffer or houlsby")
        _check(self.reduction_factor > 0, f"reduction_factor={self.reduction_factor}; expected > 0")
        _check_used(self)


def pattern_dict(cfg: ModelConfig, name: str) -> dict:
    """``rank_pattern`` / ``alpha_pattern`` entries ``"REGEX=VALUE"`` (or JSON pairs) as a dict."""
    out = {}
    kind = int if name == "rank_pattern" else float
    for entry in getattr(cfg, name):
        key, value = (entry.rsplit("=", 1) if isinstance(entry, str) and "=" in entry else
                      entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else (None, None))
        try:
            out[key] = kind(value)
        except (TypeError, ValueError):
            key = None
        if not key:
            raise ValueError(f"{name} entry {entry!r}; expected REGEX={'R' if kind is int else 'ALPHA'}, e.g. v_proj=4")
    return out


@dataclass(frozen=True)
class DataConfig:
    data: str = "rotten_tomatoes"   # bundled name, a .csv / .json / .jsonl file or a datasets folder (docs/training.md)
    eval_data: str = ""             # a separate held-out file or folder ("" = split --data)
    task: str = "auto"              # classify (head on text) | instruct (causal LM on a template) | auto
    template: str = "auto"          # instruct: auto (chat if the tokenizer has one, else seed) | chat | seed | none
    text_column: str = "text"       # classification data: the column / field holding the text
    label_column: str = "label"     # classification data: the column / field holding the label (a name or an integer)
    max_length: int = 256           # tokens per example, prompt and answer together; longer ones are truncated
    padding_side: str = "right"     # right | left padding in the collator
    packing: bool = False           # instruct: fill rows of max_length with several examples (lora / qlora)
    group_by_length: bool = False   # batch examples of similar length together (less padding)
    instruction: str = "Is the sentiment of this review positive or negative?"  # classification -> instruct records
    label_words: tuple = ()         # classification -> instruct: answer word per label id (default: the label names)
    num_labels: int = 0             # classification: number of labels (0 = from the training data)
    eval_fraction: float = 0.2      # held-out share when the file has no ``split`` column
    max_train: int = 0              # use at most this many training examples (0 = all)
    max_eval: int = 0               # evaluate on at most this many held-out examples (0 = all)

    def __post_init__(self) -> None:
        _check_types(self)
        _check(bool(self.data), "data is empty; expected a bundled name or a file path")
        _check(self.task in TASKS, f"task={self.task!r}; expected one of {TASKS}")
        _check(self.template in TEMPLATES, f"template={self.template!r}; expected one of {TEMPLATES}")
        _check(bool(self.text_column) and bool(self.label_column), "text_column / label_column must not be empty")
        _check(self.max_length > 1, f"max_length={self.max_length}; expected > 1")
        _check(self.padding_side in ("right", "left"),
               f"padding_side={self.padding_side!r}; expected right or left")
        _check(not (self.packing and self.group_by_length), "packing and group_by_length exclude each other; pick one")
        _check(self.num_labels == 0 or self.num_labels >= 2, f"num_labels={self.num_labels}; expected >= 2 (or 0: from the training data)")
        object.__setattr__(self, "label_words", tuple(self.label_words))
        _check(not self.label_words or self.num_labels in (0, len(self.label_words)),
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
    distributed: str = "ddp"        # under torchrun: ddp (whole model per process) | fsdp2 (frozen base sharded)
    loss: str = "labelled"          # causal LM: labelled (output head only where labels are) | full (HF's logits)
    loss_chunk: int = 1024          # labelled loss: positions per head + cross-entropy chunk (bounds its memory)
    compile: bool = False           # run the model's forward through torch.compile (same numbers, to fp32 rounding)
    release_memory: str = "auto"    # CPU: hand freed heap back after each step: auto (only for 4-bit models) | step | never
    log: str = "jsonl"              # jsonl (metrics.jsonl) | tensorboard (also TensorBoard events in tensorboard/)

    def __post_init__(self) -> None:
        _check_types(self)
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
        _check(self.loss in ("labelled", "full"), f"loss={self.loss!r}; expected labelled or full")
        _check(isinstance(self.loss_chunk, int) and self.loss_chunk > 0,
               f"loss_chunk={self.loss_chunk!r}; expected an integer > 0")
        _check(self.release_memory in RELEASE_MODES,
               f"release_memory={self.release_memory!r}; expected one of {RELEASE_MODES}")
        _check(self.log in LOGS, f"log={self.log!r}; expected one of {LOGS}")
        _check(self.log != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
               "log='tensorboard' needs the tensorboard package: pip install tensorboard (or purepeft[log])")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               f"device={self.device!r}; expected auto, cpu, cuda or cuda:N")
        _check(self.distributed in DISTRIBUTED,
               f"distributed={self.distributed!r}; expected one of {DISTRIBUTED}")


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
        _check(isinstance(d, dict), f"a run config is a JSON object with model/data/loop sections, got {d!r}")
        unknown = set(d) - {"model", "data", "loop"}
        _check(not unknown, f"unknown config section(s) {sorted(unknown)}; expected model, data, loop")
        parts = {}
        for name, klass in (("model", ModelConfig), ("data", DataConfig), ("loop", LoopConfig)):
            section = d.get(name, {})
            _check(isinstance(section, dict),
                   f"config section {name!r} is {section!r} ({type(section).__name__}); expected a JSON object of fields")
            fields = {f.name for f in dataclasses.fields(klass)}
            bad = set(section) - fields
            _check(not bad, f"unknown field(s) {sorted(bad)} in section {name!r}; expected some of {sorted(fields)}")
            parts[name] = klass(**section)
        return cls(**parts)


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
