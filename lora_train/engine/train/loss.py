"""The diffusion loss of one micro-batch: noise the latents, ask the UNet, compare with what it should say.

Pure functions of tensors and the config, so they can be checked against diffusers' scheduler formulas.
"""

from __future__ import annotations

import contextlib

import torch

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.model import Conditioning, ModelBundle, Parameterization
from lora_train.engine.train import loss_terms as terms
from lora_train.engine.train import noise as noises
from lora_train.engine.train.schedules import v_prediction_scalings


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


MIN_SNR_FLOOR = 1e-8
"""Smallest SNR the Min-SNR weight divides by (a zero-terminal-SNR schedule reaches exactly 0)."""


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, parameterization: Parameterization
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023); v-prediction divides by SNR+1 instead of SNR.

    A zero-terminal-SNR schedule has SNR = 0 at its last timestep, where min(SNR, γ)/SNR is 0/0: SNR is
    clamped to a tiny floor (as kohya clamps it to 1000 where it is infinite), which gives that step the
    weight's limit (1 for epsilon, 0 for v) instead of NaN.
    """
    alpha = alphas_cumprod[timesteps]
    snr = torch.clamp(alpha / (1 - alpha), min=MIN_SNR_FLOOR)
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
                   sample_weights: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                   rows_of: tuple[slice, int] | None = None) -> torch.Tensor:
    """Mean loss of a batch; every random draw comes from ``generator``, so a resumed run draws the same.

    ``sample_weights`` scales each sample's loss (regularization images get ``prior_loss_weight``); ``masks``
    ([batch, 1, h, w], 1 = train) zero the loss where the images are masked out. The order is kohya's: element
    loss, mask, mean per sample, sample weights, then the SNR weightings.
    ``rows_of`` = (rows, size): ``latents`` are these rows of a global batch of that size (one process of
    several); the noise and timesteps are drawn for the whole batch and these rows kept, as one process would.
    """
    device = latents.device
    rows, size = rows_of or (slice(None), len(latents))
    noise = noises.training_noise(cfg, latents, generator, rows, size)
    timesteps = noises.timesteps(cfg, size, len(alphas), generator, device)[rows]
    noisy = add_noise(latents, noises.perturbed(cfg, noise, generator, rows, size), timesteps, alphas)
    with autocast(cfg, device):
        prediction = bundle.predict(noisy.to(bundle.dtype), timesteps, cond)
    target = loss_target(bundle.parameterization, latents, noise, timesteps, alphas)
    huber_c = terms.huber_threshold(cfg, timesteps, alphas)
    loss = terms.masked(terms.elementwise_loss(prediction.float(), target, cfg.loss_type, huber_c), masks)
    loss = loss.mean(dim=(1, 2, 3))
    if sample_weights is not None:
        loss = loss * sample_weights
    if cfg.min_snr_gamma:
        loss = loss * min_snr_weights(timesteps, alphas, cfg.min_snr_gamma, bundle.parameterization)
    loss = v_prediction_scalings(cfg, loss, timesteps, alphas)  # kohya's order: after min-SNR
    if cfg.debiased_estimation_loss:
        loss = loss * terms.debiased_weights(timesteps, alphas, bundle.parameterization)
    return loss.mean()
