"""lora: LoRA (rsLoRA, DoRA) for Hugging Face models in pure PyTorch, by module surgery."""
from .config import LoRAConfig
from .heads import TrainedCopy
from .inject import add_lora, lora_parameters, merge_lora, remove_lora, unmerge_lora
from .layer import LoRALinear
from .summary import trainable_summary
from .targets import DEFAULT_TARGETS, LINEAR_TYPES

__all__ = [
    "LoRAConfig", "LoRALinear", "TrainedCopy", "add_lora", "remove_lora", "merge_lora", "unmerge_lora",
    "lora_parameters", "trainable_summary", "DEFAULT_TARGETS", "LINEAR_TYPES",
]
