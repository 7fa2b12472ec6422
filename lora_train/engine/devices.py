"""Which device a run uses and the dtype its frozen base weights take there: one rule for the SD and LLM loops."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as torch spells it."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def frozen_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """Frozen base weights in half precision on a GPU when training mixed precision; float32 on the CPU or
    without mixed precision (the adapters always train in float32)."""
    if device.type == "cpu" or mixed_precision == "no":
        return torch.float32
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16
