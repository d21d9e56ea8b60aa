"""The run-folder lock: at most one run writes into a given ``--out`` at a time.

``hold_run_folder`` creates the folder when needed and holds an exclusive ``fcntl.flock`` on it
for the whole run; a second run into the same folder is refused at once (it never waits, and
writes nothing). Checks that need the folder to be stable (is it empty? which checkpoint is
the latest?) are made while the lock is held. A folder this run created and left empty (the run
failed before writing anything) is removed again, before the lock is released.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

__all__ = ["RunFolderBusy", "hold_run_folder"]


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


def _check_target(run_dir: Path) -> list[Path]:
    """Raise a ValueError naming ``run_dir`` when it cannot be a run folder; return the missing
    folders (outermost first) that creating it will make."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file; expected a run folder (new, empty, or a run to --resume)")
    missing, anc = [], run_dir
    while not anc.exists():
        missing.append(anc)
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise ValueError(f"--out {run_dir}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"--out {run_dir}: {anc} is not writable")
    return missing[::-1]


@contextlib.contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[bool]:
    """Create (if needed) and exclusively lock ``run_dir`` for the ``with`` block.

    Yields:
        True when this call created the folder.
    Raises:
        ValueError: ``run_dir`` is a file, lies under a file, or cannot be created/written.
        RunFolderBusy: another run holds the folder.
    """
    run_dir = Path(run_dir)
    missing = _check_target(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {run_dir}: cannot create the folder ({err.strerror})") from None
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError as err:
        raise ValueError(f"--out {run_dir}: cannot open the folder ({err.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"run folder {run_dir} is in use by another run (it holds the folder's lock); "
                                "wait for it to finish or pick another --out") from None
        try:
            yield bool(missing)
        finally:
            for folder in reversed(missing):  # innermost first; only folders still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
    finally:
        os.close(fd)  # closing the descriptor releases the lock
