"""Reading weight files without running pickled code: shared by the checkpoint loader, the captioner and the
preflight checks.

Any file a user points at may be truncated, random bytes or a pickle with code in it; every reader here turns
that into one ``WeightsFileError`` line naming the file and what to do, never a library traceback.
"""

from __future__ import annotations

import pickle
import re
import zipfile
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
