"""The small interface the trainer needs from a model, whoever holds it (diffusers for the CLI, the WebUI's
live LDM object for the tab). Keeping it this small is what lets both hosts share one loop and one exporter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from lora_train.engine.data.prompt_chunks import PromptTokens

Family = Literal["sd1", "sd2", "sdxl"]
Parameterization = Literal["eps", "v"]
UnetLayout = Literal["diffusers", "ldm"]

# What kohya writes into ss_base_model_version, and the modelspec architecture, per family.
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass
class Conditioning:
    """Text conditioning for one batch.

    ``context`` feeds cross-attention; ``pooled`` and ``size_ids`` (original h, w, crop top, left, target h,
    w per sample) are SDXL's extra vector conditioning and stay None for SD1/SD2.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    size_ids: torch.Tensor | None = None


@dataclass
class LoraTarget:
    """One module to wrap with LoRA: where it lives and what kohya calls it in a file.

    ``prepare`` (shared by the targets it makes) creates the module first and returns how to take it away
    again, e.g. OpenCLIP's q/k/v views (``network/fused_attention``); it runs at injection, its undo at removal.
    """

    root: nn.Module
    path: str
    kohya_key: str
    prepare: Callable[[], Callable[[], None]] | None = field(default=None, compare=False, repr=False)


class UnetPlacement:
    """``device`` and ``dtype`` of a bundle, read off its UNet's first parameter: where and in what the model
    trains. Not diffusers' ``ModelMixin.device``/``.dtype``: those walk every parameter, ~5 ms a call on SD1.5."""

    unet: nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


class ModelBundle(Protocol):
    """A loaded diffusion model as the trainer sees it."""

    family: Family
    parameterization: Parameterization
    unet: nn.Module
    text_encoders: list[nn.Module]
    alphas_cumprod: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    model_name: str

    def tokenize(self, captions: list[str], max_chunks: int = 1, weighted: bool = False) -> PromptTokens:
        """Token ids per text encoder, each [batch, chunks * 77]: the WebUI's 75-token chunks, at most
        ``max_chunks``; emphasis multipliers only when ``weighted``."""

    def encode_text(self, tokens: PromptTokens) -> Conditioning:
        """Run the text encoder(s) chunk by chunk; gradients flow when their LoRA is trained."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [B, 3, H, W] → latents already multiplied by the VAE scale factor."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels in [-1, 1] (for sample images)."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's raw output (noise for eps models, velocity for v models)."""

    def lora_targets(self, text_encoder: bool, conv: bool = False) -> list[LoraTarget]:
        """Modules kohya's LoRA wraps: UNet transformer blocks, the CLIP layers if asked, and with ``conv`` the
        UNet's ResNet blocks and down/upsamplers (LoCon)."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Trade compute for memory in the UNet (and trained text encoders)."""
