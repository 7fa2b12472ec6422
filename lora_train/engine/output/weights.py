"""Reading weight files without running pickled code: shared by the checkpoint loader, the captioner and the
preflight checks.

Any file a user points at may be truncated, random bytes or a pickle with code in it; every reader here turns
that into one ``WeightsFileError`` line naming the file and what to do, never a library traceback.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


class WeightsFileError(ValueError):
    """A weights file that cannot be read as one; the message names the file and what to do."""


def _unwrap(data: Any) -> Any:
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        return data["state_dict"]
    return data


def _torch_load(path: Path, mmap: bool) -> Any:
    """torch.load weights-only; mmap for zip-format files so reading only the key names stays cheap."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if not re.search(r"Unsupported (global|class)", str(exc)):  # random bytes also fail to unpickle
            raise _unreadable(path, "not a weights pickle") from None
        raise WeightsFileError(
            f"{path}: this file stores Python objects besides the weights, which we do not unpickle (they can "
            f"run code). Convert it to .safetensors (e.g. with the WebUI's Checkpoint Merger) and use that."
        ) from None
    except Exception as exc:  # noqa: BLE001 - zip/pickle/EOF errors all mean "damaged file" to the user
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException | str) -> WeightsFileError:
    detail = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]
    kind = "a .safetensors" if path.suffix == ".safetensors" else "a torch weights"
    return WeightsFileError(
        f"{path} is not {kind} file we can read (truncated, damaged, or another format: {detail}); "
        "download or export it again"
    )


def _check_suffix(path: Path) -> None:
    if not path.is_file():
        raise WeightsFileError(f"{path} not found" if not path.exists() else f"{path} is not a file")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise WeightsFileError(f"{path}: unknown weights file type {path.suffix!r}; use .safetensors or .ckpt")


def load_tensors(path: Path) -> Any:
    """A .safetensors file, or a torch pickle loaded weights-only; a ``state_dict`` wrapper is unwrapped.

    Callers check what came back (a non-empty mapping of tensors) and word their own errors.
    """
    path = Path(path)
    _check_suffix(path)
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - SafetensorError is not importable on every safetensors
            raise _unreadable(path, exc) from None
    return _unwrap(_torch_load(path, mmap=False))


STREAM_WINDOW = 64 * 2**20
"""Bytes read through one safetensors mapping before it is closed (its resident pages let go) and reopened."""


class StreamedTensors(MutableMapping):
    """A checkpoint's tensors, each read from the file when asked for and copied to ``dtype`` (floating-point
    ones) and ``device`` at once, so a model built from it holds each tensor once, in its final form.

    Why: ``load_file`` maps the whole file, and every page read stays resident until the last tensor of it is
    gone: a model assigned from it and then cast to fp32 held model + file (SDXL on CPU: 13.5 + 6.5 GB).
    Here safetensors' ``safe_open`` reads lazily and its mapping is closed and reopened every ``window``
    bytes, so the pages held at any time are at most about one window or one tensor. Keys may be set and
    deleted like a dict's (diffusers' converters pop what they take); a torch pickle is loaded whole (it has
    no lazy reader), its tensors converted on the way out the same.
    """

    def __init__(self, path: Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 window: int | None = None):
        self.path, self.dtype, self.device = Path(path), dtype, device
        self.window = window or STREAM_WINDOW
        self._handle: Any = None
        self._read = 0
        self._set: dict[str, torch.Tensor] = {}
        self._pickle: dict[str, Any] | None = None
        if self.path.suffix.lower() == ".safetensors":
            self._shapes = read_header(self.path)[0]
            self._keys = dict.fromkeys(self._shapes)
        else:
            self._pickle = load_tensors(self.path)
            if not isinstance(self._pickle, dict):
                raise WeightsFileError(f"{path} holds a {type(self._pickle).__name__}, not named weights; use a "
                                       "checkpoint file")
            self._keys = dict.fromkeys(self._pickle)
            self._shapes = {k: tuple(v.shape) for k, v in self._pickle.items() if isinstance(v, torch.Tensor)}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape as the file holds it (from the header: nothing is read)."""
        return self._shapes

    def _convert(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        dtype = self.dtype if self.dtype is not None and value.is_floating_point() else value.dtype
        return value.to(device=self.device or "cpu", dtype=dtype, copy=True)  # never a view of the file

    def _from_file(self, key: str) -> Any:
        if self._pickle is not None:
            return self._convert(self._pickle[key])
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt")
            tensor = self._handle.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - see load_tensors
            raise _unreadable(self.path, exc) from None
        self._read += tensor.numel() * tensor.element_size()
        converted = self._convert(tensor)
        del tensor
        if self._read >= self.window:
            self.close()
        return converted

    def close(self) -> None:
        """Drop the file mapping (and with it the pages read so far); the next read opens it again."""
        self._handle, self._read = None, 0

    def __getitem__(self, key: str) -> Any:
        if key in self._set:
            return self._set[key]
        if key not in self._keys:
            raise KeyError(key)
        return self._from_file(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._keys[key] = None
        self._set[key] = value

    def __delitem__(self, key: str) -> None:
        del self._keys[key]
        self._set.pop(key, None)
        if self._pickle is not None:
            self._pickle.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._set or key in self._keys


def read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor names with their shapes, and the metadata, without loading the tensors' data.

    .safetensors: the header only; torch zip files: memory-mapped. Cheap enough to check a 7 GB checkpoint
    before the real load.
    """
    path = Path(path)
    _check_suffix(path)
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                metadata = handle.metadata() or {}
        except Exception as exc:  # noqa: BLE001 - see load_tensors
            raise _unreadable(path, exc) from None
        return shapes, metadata
    data = _unwrap(_torch_load(path, mmap=True))
    if not isinstance(data, dict):
        raise WeightsFileError(f"{path} holds a {type(data).__name__}, not named weights; use a checkpoint file")
    return {key: tuple(value.shape) for key, value in data.items() if isinstance(value, torch.Tensor)}, {}
