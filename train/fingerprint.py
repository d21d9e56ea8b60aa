"""What decides a run's numbers besides its config: content hashes of data, model and tokenizer.

``--resume`` compares the fingerprint stored in the checkpoint with the one of the inputs it is
given now, group by group, so that a changed data file (same name, other rows), other weights in
the same folder, or another tokenizer are refused like a changed option.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

__all__ = ["file_sha256", "sampled_sha256", "run_fingerprint", "RESUME_FREE_LOOP_FIELDS", "resume_differences"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
_TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece", "chat_template")
# loop fields that do not change the numbers: a resumed run may use other values
RESUME_FREE_LOOP_FIELDS = ("device", "progress", "save_every", "eval_every", "log")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_FULL_HASH_LIMIT = 64 << 20  # files up to 64 MiB are hashed whole
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 16


def sampled_sha256(path: Path) -> str:
    """sha256 of a file up to 64 MiB; above that, of its size, first 1 MiB (a safetensors header
    with every name, shape and offset) and 64 evenly spaced 64 KiB chunks: other weights of the
    same shapes differ in every chunk, and a 14 GB checkpoint is fingerprinted in milliseconds."""
    size = Path(path).stat().st_size
    if size <= _FULL_HASH_LIMIT:
        return file_sha256(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        for i in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return "sampled:" + h.hexdigest()


def _folder_files(folder: Path, keep, digest=file_sha256) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and keep(p.name)}


def run_fingerprint(cfg, folder: Path, tokenizer, template: str) -> dict:
    """Content hashes grouped like the config: ``{"model": ..., "data": ..., "tokenizer": ...}``.

    Args:
        cfg: the RunConfig.
        folder: the backbone's Hugging Face folder.
        tokenizer: the loaded tokenizer (its pad/eos ids count).
        template: the chat template rendered with placeholders (the template's identity).
    """
    from .data import BUNDLED_DATA
    data = {"template": template}
    for f in dataclasses.fields(cfg.data):  # every field naming a file: the data (and any eval data)
        value = getattr(cfg.data, f.name)
        if isinstance(value, str) and value:
            path = BUNDLED_DATA.get(value, Path(value))
            if path.is_file():
                data[f"{f.name}_sha256"] = file_sha256(path)
    model = {"config.json": file_sha256(Path(folder) / "config.json"),
             **_folder_files(folder, lambda n: n.endswith(_WEIGHT_SUFFIXES), sampled_sha256)}
    tok = _folder_files(folder, lambda n: n.startswith(_TOKENIZER_PREFIXES))
    tok.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=getattr(tokenizer, "bos_token_id", None))
    return {"model": model, "data": data, "tokenizer": tok}


def resume_differences(saved_run: dict, saved_fp: dict, run: dict, fp: dict) -> list[str]:
    """Every ``group.field: checkpoint -> now`` difference that makes a resume change the numbers.

    Args:
        saved_run, run: ``RunConfig.to_dict()`` of the checkpoint and of now.
        saved_fp, fp: ``run_fingerprint`` of the checkpoint and of now (``{}`` skips the check,
            for checkpoints written before fingerprints existed).
    """
    out = []
    for group in ("model", "data", "loop"):
        old, new = saved_run.get(group, {}), run.get(group, {})
        for key in sorted(set(old) | set(new)):
            if group == "loop" and key in RESUME_FREE_LOOP_FIELDS:
                continue
            if key in old and old.get(key) != new.get(key):
                out.append(f"{group}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    for group in ("model", "data", "tokenizer") if saved_fp else ():
        old, new = saved_fp.get(group, {}), fp.get(group, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.append(f"{group} fingerprint {key}: {_short(old.get(key))} -> {_short(new.get(key))}")
    return out


def _short(value):
    return value[-64:][:12] + "…" if isinstance(value, str) and len(value) >= 64 else repr(value)
