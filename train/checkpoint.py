"""Resumable checkpoints: safetensors + JSON only, written atomically.

A checkpoint is a folder ``<run>/checkpoints/step-<N>/`` holding
- ``trainable.safetensors``: every trainable parameter by its name in the model;
- ``optimizer.safetensors``: the optimizer's per-parameter state tensors, keyed
  ``"<param index>.<state name>"`` (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``);
- ``rng.safetensors``: the torch CPU generator state (and each CUDA device's);
- ``state.json``: step, optimizer param-group hyper-parameters, GradScaler state, python
  ``random`` state, the run config and any extra fields;
- ``adapter/``: the method's own adapter folder, when a writer is given.
The folder is built under a temporary name (``.step-<N>.*``), its files fsynced, and renamed
into place; ``<run>/checkpoints/latest.json`` then names it (replaced atomically), so a run
killed at any point, or a disk that fills up, leaves the previous checkpoint intact and named.
Temporary folders of killed writes are removed by ``remove_orphans`` on the next start. A
missing or corrupt ``latest.json`` falls back to the newest complete ``step-*`` folder.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import default_dir_mode, default_mode, fsync_dir, write_json_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "read_state", "remove_orphans",
           "write_json_atomic", "named_trainable", "CheckpointWriteError"]

log = logging.getLogger(__name__)
_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


def _fsync_tree(folder: Path) -> None:
    """Give every file under ``folder`` the ordinary mode and flush files and folders to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            os.chmod(path, default_mode())  # safetensors creates 0600 files
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for sub in sorted(p for p in folder.rglob("*") if p.is_dir()):
        fsync_dir(sub)
    fsync_dir(folder)


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete temporary checkpoint folders (and temp files) left by killed writes; returns them."""
    root = Path(run_dir) / "checkpoints"
    gone = [p for p in root.glob(".step-*") if p.is_dir()] if root.is_dir() else []
    for folder in (Path(run_dir), root, Path(run_dir) / "adapter"):
        if folder.is_dir():
            gone += [p for p in folder.glob(".*.tmp") if p.is_file()]
    for p in gone:
        log.info("removing %s, left by an interrupted write", p)
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return gone


def named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter with ``requires_grad``, in registration order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _rng_state() -> tuple[dict[str, torch.Tensor], list]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    return tensors, [py[0], list(py[1]), py[2]]


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler_state: Optional[dict], extra: dict,
                    write_adapter: Optional[Callable[[torch.nn.Module, Path], None]] = None,
                    keep: int = 1) -> Path:
    """Write a resumable checkpoint of ``step`` and point ``latest.json`` at it.

    Args:
        run_dir: the run folder; checkpoints go under ``run_dir/checkpoints``.
        step: optimizer steps completed.
        model: the (unwrapped) adapted model.
        optimizer: its optimizer; states are saved per trainable-parameter index.
        scaler_state: ``GradScaler.state_dict()`` or None.
        extra: JSON-ready fields stored in ``state.json`` (config, metrics...).
        write_adapter: writes the method's adapter folder into a given path.
        keep: how many newest checkpoints to keep.
    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    previous = latest_checkpoint(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    except OSError as err:
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} under {root}: {err}; "
                                   f"previous checkpoint: {previous or 'none'}") from err
    try:
        named = named_trainable(model)
        save_file({n: p.detach().contiguous().cpu() for n, p in named}, tmp / "trainable.safetensors")
        index = {id(p): i for i, (_, p) in enumerate(named)}
        opt = optimizer.state_dict()
        # state_dict numbers params by their order in param_groups; map back to our indices
        order = [p for g in optimizer.param_groups for p in g["params"]]
        tensors, scalars = {}, {}
        for k, st in opt["state"].items():
            i = index[id(order[k])]
            for name, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{i}.{name}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{i}.{name}"] = v
        save_file(tensors, tmp / "optimizer.safetensors")
        rng_tensors, py_rng = _rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]
        state = {"step": step, "param_groups": groups, "optimizer_scalars": scalars,
                 "scaler": scaler_state, "python_rng": py_rng,
                 "trainable_names": [n for n, _ in named], **extra}
        write_json_atomic(tmp / "state.json", state)
        if write_adapter is not None:
            write_adapter(model, tmp / "adapter")
        _fsync_tree(tmp)
        os.chmod(tmp, default_dir_mode())  # mkdtemp makes 0700
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        write_json_atomic(root / "latest.json", {"step": step, "folder": final.name})
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} under {root}: {err}; "
                                   f"the previous checkpoint is intact: {previous or 'none'}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _complete(folder: Path) -> bool:
    if not all((folder / f).is_file() for f in _FILES):
        return False
    try:
        json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return True


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The folder ``latest.json`` names, or None when the run has no checkpoint.

    A missing, corrupt or dangling ``latest.json`` (or one naming an incomplete folder) falls
    back to the newest complete ``step-*`` folder, with a warning.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest.json"
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text(encoding="utf-8"))["folder"]
            folder = root / name
            if isinstance(name, str) and name.startswith("step-") and _complete(folder):
                return folder
            log.warning("%s names %r, which is not a complete checkpoint; looking for the newest one", pointer, name)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            log.warning("%s is corrupt; looking for the newest complete checkpoint", pointer)
    found = sorted(p for p in root.glob("step-*") if p.is_dir() and _complete(p)) if root.is_dir() else []
    return found[-1] if found else None


def read_state(folder: Path) -> dict:
    """``state.json`` of a checkpoint folder; a ValueError names a corrupt file."""
    path = Path(folder) / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path}: expected an object with an integer 'step'")
    return state


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable tensors, optimizer state and RNG from ``folder``; return ``state.json``.

    Raises:
        ValueError: the model's trainable parameters differ from the checkpoint's (names listed).
    """
    folder = Path(folder)
    state = read_state(folder)
    named = named_trainable(model)
    names = [n for n, _ in named]
    saved = state["trainable_names"]
    if sorted(names) != sorted(saved):
        missing = sorted(set(saved) - set(names))
        unexpected = sorted(set(names) - set(saved))
        raise ValueError(f"checkpoint {folder} does not fit this model: missing {missing}, "
                         f"unexpected {unexpected}")
    tensors = _load(folder / "trainable.safetensors")
    with torch.no_grad():
        for n, p in named:
            if tensors[n].shape != p.shape:
                raise ValueError(f"checkpoint {folder}: {n} has shape {tuple(tensors[n].shape)}, "
                                 f"the model {tuple(p.shape)}")
            p.copy_(tensors[n])
    opt_tensors = _load(folder / "optimizer.safetensors")
    order = [p for g in optimizer.param_groups for p in g["params"]]
    slot = {n: i for i, n in enumerate(saved)}  # the checkpoint numbers states in its own order
    index = {id(p): slot[n] for n, p in named}
    per_param: dict[int, dict] = {}
    for key, v in list(opt_tensors.items()) + list(state["optimizer_scalars"].items()):
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = v
    opt_state = {k: per_param[index[id(p)]] for k, p in enumerate(order) if index[id(p)] in per_param}
    groups = [dict(saved, params=[k for k, _ in enumerate(g["params"])])
              for saved, g in zip(state["param_groups"], optimizer.param_groups)]
    # param indices in a state_dict run across groups; renumber them the same way
    start = 0
    for g in groups:
        g["params"] = [start + k for k in g["params"]]
        start += len(g["params"])
    for g in groups:
        for k, v in list(g.items()):
            if k == "betas":
                g[k] = tuple(v)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    rng = _load(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    log.info("resumed from %s (step %d)", folder, state["step"])
    return state
