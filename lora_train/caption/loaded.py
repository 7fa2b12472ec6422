"""The captioner the UI keeps loaded between clicks, and freeing it before training."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_train.caption.coca import Captioner
from lora_train.caption.coca_weights import DEFAULT_MODEL

_LOADED: dict[tuple, Captioner] = {}


def get_captioner(
    model_name: str = DEFAULT_MODEL,
    weights: str | Path | None = None,
    models_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
) -> Captioner:
    """A loaded Captioner, reused across calls with the same arguments (the UI's Caption button)."""
    key = (model_name, str(weights), str(models_dir), str(device))
    if key not in _LOADED:
        unload()
        _LOADED[key] = Captioner.load(
            model_name, weights=weights, models_dir=models_dir, device=device, allow_download=allow_download
        )
    return _LOADED[key]


def unload() -> None:
    """Free the cached captioner's memory (call before training starts); each unload collects and frees."""
    while _LOADED:
        _, captioner = _LOADED.popitem()
        captioner.unload()
