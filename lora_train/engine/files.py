"""Safe file writes: a crash or a stop never leaves a half-written file, and nothing is overwritten silently."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0o666 less the process umask (read once; setting the
    umask is the only way to read it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


class OutputExistsError(FileExistsError):
    """Raised when a write would replace a file the user did not ask to replace."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` for a temp file beside ``path``, fsync it, then rename it into place.

    The rename is atomic on one filesystem, so readers (the WebUI's Lora list, a resumed run) see either
    the old file or the whole new one. The file gets the umask's mode like any other new file (mkstemp's 0600
    would hide it from a WebUI or ComfyUI running as another user or in a container).
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
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def first_free(name: str, taken: Callable[[str], bool]) -> str:
    """``name``, or the first of ``name-2``, ``name-3``... that is not ``taken``: the one free-name rule.

    kohya overwrites silently; every place we create an output (file, checkpoint folder, dataset folder, a
    whole run) picks its name here instead, so existing work is never replaced.
    """
    candidate, n = name, 2
    while taken(candidate):
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def free_name(folder: str | Path, name: str, suffixes: tuple[str, ...] = ("",)) -> str:
    """``name``, or the first ``name-N``, for which no ``folder/<candidate><suffix>`` exists for any suffix."""
    folder = Path(folder)
    return first_free(name, lambda candidate: any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes))


def free_path(path: str | Path, overwrite: bool = False) -> Path:
    """Return ``path`` if it is free (or ``overwrite``), else the first free ``stem-N.suffix`` beside it."""
    path = Path(path)
    if overwrite:
        return path
    return path.with_name(free_name(path.parent, path.stem, (path.suffix,)) + path.suffix)
