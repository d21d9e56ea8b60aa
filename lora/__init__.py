"""lora: LoRA (rsLoRA, DoRA, embeddings), IA3, bottleneck adapters and QLoRA's NF4 base for Hugging Face models, in pure PyTorch."""
from .base import AdapterLayer
from .bottleneck import BottleneckAdapter, BottleneckConfig
from .bottleneck_inject import (add_bottleneck, bottleneck_parameters, bottleneck_state_dict,
                                remove_bottleneck)
from .bottleneck_io import load_bottleneck, save_bottleneck
from .config import LoRAConfig
from .embedding import LoRAEmbedding
from .heads import TrainedCopy
from .ia3 import IA3Config, IA3Layer, add_ia3
from .inject import add_lora, inject_adapters, lora_parameters, merge_lora, remove_lora, unmerge_lora
from .io import load_lora, lora_state_dict, save_lora
from .layer import LoRALinear
from .nf4 import NF4State, dequantize_nf4, quantize_nf4
from .nf4_linear import NF4Linear
from .quantize import (QuantReport, dequantize_model, load_quantized, memory_report,
                       quantize_model, save_quantized)
from .stream import NF4Config, TensorFiles, load_streamed
from .summary import trainable_summary
from .targets import DEFAULT_TARGETS, IA3_DEFAULT_TARGETS, IA3_FEEDFORWARD, LINEAR_TYPES, LORA_TYPES

__all__ = [
    "LoRAConfig", "LoRALinear", "TrainedCopy", "add_lora", "remove_lora", "merge_lora", "unmerge_lora",
    "lora_parameters", "lora_state_dict", "save_lora", "load_lora", "trainable_summary",
    "DEFAULT_TARGETS", "LINEAR_TYPES", "LORA_TYPES", "IA3_DEFAULT_TARGETS", "IA3_FEEDFORWARD",
    "AdapterLayer", "LoRAEmbedding", "IA3Config", "IA3Layer", "add_ia3", "inject_adapters",
    "NF4Linear", "quantize_nf4", "dequantize_nf4", "quantize_model", "dequantize_model",
    "NF4State", "memory_report", "QuantReport", "save_quantized", "load_quantized",
    "BottleneckConfig", "BottleneckAdapter", "add_bottleneck", "remove_bottleneck", "bottleneck_parameters",
    "bottleneck_state_dict", "save_bottleneck", "load_bottleneck",
    "NF4Config", "TensorFiles", "load_streamed",
]
