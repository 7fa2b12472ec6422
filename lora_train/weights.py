"""Reading weight files without running pickled code: shared by the checkpoint loader and the captioner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def load_tensors(path: Path) -> Any:
    """A .safetensors file, or a torch pickle loaded weights-only; a ``state_dict`` wrapper is unwrapped.

    Callers check what came back (a non-empty mapping of tensors) and word their own errors.
    """
    if path.suffix == ".safetensors":
        return load_file(str(path))
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        return data["state_dict"]
    return data
