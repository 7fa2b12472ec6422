"""Safe file writes: a crash or a stop never leaves a half-written file, and nothing is overwritten silently."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class OutputExistsError(FileExistsError):
    """Raised when a write would replace a file the user did not ask to replace."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` for a temp file beside ``path``, fsync it, then rename it into place.

    The rename is atomic on one filesystem, so readers (the WebUI's Lora list, a resumed run) see either
    the old file or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def free_path(path: str | Path, overwrite: bool = False) -> Path:
    """Return ``path`` if it is free (or ``overwrite``), else the first free ``stem-N.suffix`` beside it.

    kohya overwrites silently; we keep the old file and write a versioned name instead.
    """
    path = Path(path)
    if overwrite or not path.exists():
        return path
    n = 2
    while True:
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists():
            return candidate
        n += 1
