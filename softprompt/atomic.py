"""Atomic file writes: a temporary file in the target folder, fsync, rename, fsync the folder.

A reader never sees a half-written file, and a crash or a full disk leaves the previous file
(if any) untouched. The file gets the mode an ordinary ``open(path, "w")`` would give it
(0666 minus the umask), not the 0600 of ``tempfile.mkstemp``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "default_mode"]


def default_mode() -> int:
    """0o666 minus the process umask: the mode ``open(path, "w")`` creates files with."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: Union[str, os.PathLike]) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Let ``write(tmp_path)`` fill a temporary file, then move it onto ``path`` atomically.

    Args:
        path: the final file; its folder must exist.
        write: writes the whole content to the path it is given.
    Raises:
        whatever ``write`` or the file system raises (``OSError`` for a full disk); the
        temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """``atomic_write`` of a UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
