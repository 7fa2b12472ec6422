"""The diffusion loss of one micro-batch: noise the latents, ask the UNet, compare with what it should say.

Pure functions of tensors and the config, so they can be checked against diffusers' scheduler formulas.
"""

from __future__ import annotations

import contextlib

import torch

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.model import Conditioning, ModelBundle, Parameterization


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    alpha = alphas_cumprod[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def loss_target(
    parameterization: Parameterization, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """What the UNet should output: the noise (eps models) or the velocity (v-prediction models)."""
    if parameterization == "eps":
        return noise
    alpha = alphas_cumprod[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return alpha.sqrt() * noise - (1 - alpha).sqrt() * latents


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, parameterization: Parameterization
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023); v-prediction divides by SNR+1 instead of SNR."""
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if parameterization == "v" else clipped / snr


def autocast(cfg: TrainConfig, device: torch.device):
    """The forward pass's mixed precision as ``cfg`` asks (a no-op for mixed_precision "no")."""
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def diffusion_loss(cfg: TrainConfig, bundle: ModelBundle, latents: torch.Tensor, cond: Conditioning,
                   alphas: torch.Tensor, generator: torch.Generator,
                   sample_weights: torch.Tensor | None = None,
                   rows_of: tuple[slice, int] | None = None) -> torch.Tensor:
    """Mean loss of a batch; every random draw comes from ``generator``, so a resumed run draws the same.

    ``sample_weights`` scales each sample's loss (regularization images get ``prior_loss_weight``).
    ``rows_of`` = (rows, size): ``latents`` are these rows of a global batch of that size (one process of
    several); the noise and timesteps are drawn for the whole batch and these rows kept, as one process would.
    """
    device = latents.device
    rows, size = rows_of or (slice(None), len(latents))
    noise = torch.randn((size, *latents.shape[1:]), generator=generator, device=device)[rows]
    if cfg.noise_offset:
        offset = torch.randn((size, latents.shape[1], 1, 1), generator=generator, device=device)[rows]
        noise += cfg.noise_offset * offset
    timesteps = torch.randint(0, len(alphas), (size,), generator=generator, device=device)[rows]
    noisy = add_noise(latents, noise, timesteps, alphas)
    with autocast(cfg, device):
        prediction = bundle.predict(noisy.to(bundle.dtype), timesteps, cond)
    target = loss_target(bundle.parameterization, latents, noise, timesteps, alphas)
    loss = torch.nn.functional.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        loss = loss * min_snr_weights(timesteps, alphas, cfg.min_snr_gamma, bundle.parameterization)
    return loss.mean() if sample_weights is None else (loss * sample_weights).mean()
