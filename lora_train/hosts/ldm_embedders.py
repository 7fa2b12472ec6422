"""What the WebUI's LDM model object is, read from its text embedders: SD1 (HF CLIP inside ldm's
FrozenCLIPEmbedder, which A1111 wraps), SD2 (OpenCLIP) or SDXL (sgm's conditioner). Duck-typed: nothing here
imports A1111, ``ldm`` or ``sgm``."""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_train.engine.model import Family


def inner(module: nn.Module) -> nn.Module:
    """The embedder A1111's sd_hijack wrapped (``FrozenCLIPEmbedderWithCustomWords.wrapped``), or the module."""
    wrapped = getattr(module, "wrapped", None)
    return wrapped if isinstance(wrapped, nn.Module) else module


def is_hf_clip(embedder: nn.Module) -> bool:
    return isinstance(getattr(embedder, "transformer", None), nn.Module) and hasattr(embedder, "tokenizer")


def is_open_clip(embedder: nn.Module) -> bool:
    model = getattr(embedder, "model", None)
    return model is not None and hasattr(model, "token_embedding") and hasattr(model, "transformer")


def detect_family(sd_model: Any) -> Family:
    """SD1, SD2 or SDXL from the object's structure (A1111's ``is_sdxl``/``is_sd3`` flags are honoured)."""
    for flag in ("is_sd3", "is_flux"):
        if getattr(sd_model, flag, False):
            raise ValueError(f"the WebUI's model is {flag[3:].upper()}; LoRA training here supports SD1, SD2, SDXL")
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return "sdxl"
    cond = getattr(sd_model, "cond_stage_model", None)
    if cond is None:
        raise ValueError(f"{type(sd_model).__name__} has no text encoder (cond_stage_model); not an SD model")
    embedder = inner(cond)
    if is_hf_clip(embedder):
        return "sd1"
    if is_open_clip(embedder):
        return "sd2"
    raise ValueError(f"unsupported text encoder {type(embedder).__name__}: expected SD1 (CLIP) or SD2 (OpenCLIP)")
