"""train: data, the training loop, resumable checkpoints and the `python -m train` command line.

Import what you need from the submodules (``train.loop.train``, ``train.data.PadCollator``...);
the names below are re-exported for convenience.
"""
from .adapters import build_adapted, count_trainable, load_adapted, save_adapted
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import DataConfig, LoopConfig, ModelConfig, RunConfig
from .data import (DataError, PadCollator, encode_instruction, encode_text, format_prompt, read_records,
                   resolve_data, split_records)
from .loop import NonFiniteLossError, TrainResult, train
from .models import load_backbone, load_tokenizer, resolve_model
from .schedule import lr_factor

__all__ = [
    "train", "TrainResult", "NonFiniteLossError", "LoopConfig", "ModelConfig", "DataConfig", "RunConfig",
    "PadCollator", "DataError", "format_prompt", "encode_instruction", "encode_text", "read_records",
    "resolve_data", "split_records", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
    "build_adapted", "save_adapted", "load_adapted", "count_trainable", "resolve_model", "load_tokenizer",
    "load_backbone", "lr_factor",
]
