"""Encode images with the host's VAE in its own dtype, and in fp32 only where fp16 overflows.

The SDXL VAE overflows in fp16 (NaN latents). The WebUI answers that by switching its VAE to fp32 for good
("Automatically revert VAE to 32-bit floats"); a trainer inside the WebUI must leave the host as it found it,
so here the fp32 copy lives only for the one call and the VAE gets back its original tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def encode_finite(vae: nn.Module, encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """``encode(pixels)`` in the VAE's dtype; again in fp32 when that gave NaN/inf in a half-precision VAE."""
    first = next(vae.parameters())
    latents = encode(pixels.to(first.device, first.dtype))
    if first.dtype == torch.float32 or torch.isfinite(latents).all():
        return latents
    params = [(param, param.data) for param in vae.parameters()]
    buffers = [(module, key, buf) for module in vae.modules() for key, buf in module._buffers.items()]
    try:
        vae.float()
        return encode(pixels.to(first.device, torch.float32))
    finally:  # the very tensors the host had, not a round trip through fp32
        for param, data in params:
            param.data = data
        for module, key, buf in buffers:
            module._buffers[key] = buf
