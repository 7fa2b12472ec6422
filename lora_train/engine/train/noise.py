"""The noise a training step adds and the timesteps it adds it at, with kohya sd-scripts' options and meanings:
noise offset (random strength, adaptive scale), multires noise, input-perturbation noise, a timestep range.

Kept apart from the loss so each option is one small function of tensors, checked against its paper's formula.
Every draw comes from the step's ``generator`` (so a resumed run draws the same) in kohya's order: noise, its
offset, the multires levels, the timesteps, then the input perturbation.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from lora_train.engine.config.settings import TrainConfig


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device)


def offset_strength(cfg: TrainConfig, latents: torch.Tensor, generator: torch.Generator,
                    rows: slice = slice(None), size: int | None = None) -> torch.Tensor | float:
    """noise_offset, drawn in [0, noise_offset) per step with noise_offset_random_strength, plus
    adaptive_noise_scale x |mean latent| per image and channel (never below 0), as kohya's apply_noise_offset.

    With ``rows``/``size`` (one process's rows of a global batch) the adaptive part is [size, C, 1, 1]: this
    process's rows get theirs, the others (whose latents live elsewhere) the plain offset.
    """
    strength: torch.Tensor | float = cfg.noise_offset
    if cfg.noise_offset_random_strength:
        strength = torch.rand(1, generator=generator, device=latents.device) * cfg.noise_offset
    if cfg.adaptive_noise_scale is not None:
        latent_mean = torch.zeros((size or len(latents), latents.shape[1], 1, 1), device=latents.device)
        latent_mean[rows] = latents.mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + cfg.adaptive_noise_scale * latent_mean, min=0.0)
    return strength


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (J. Whitaker's "multires noise", kohya's pyramid_noise_like): level i adds Gaussian
    noise drawn at 1/r^i of the latent size (r uniform in [2, 4) per level), upsampled bilinearly and scaled by
    discount^i, until a level is 1 pixel wide; the sum is rescaled to unit standard deviation.

    The level sizes come from a ``random.Random`` seeded by the generator's seed: Python numbers without a GPU sync.
    """
    batch, channels, height, width = noise.shape
    sizes = random.Random(generator.initial_seed())
    result = noise
    for level in range(iterations):
        ratio = sizes.random() * 2 + 2
        level_h, level_w = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        coarse = _randn((batch, channels, level_h, level_w), noise, generator)
        result = result + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if level_h == 1 or level_w == 1:
            break
    return result / result.std()


def training_noise(cfg: TrainConfig, latents: torch.Tensor, generator: torch.Generator,
                   rows: slice = slice(None), size: int | None = None) -> torch.Tensor:
    """The noise the UNet learns to predict: Gaussian, with noise offset and multires noise when configured.

    ``latents`` may be ``rows`` of a global batch of ``size`` (one process of several): the noise is drawn for
    the whole batch and these rows kept, as one process would (multires noise rescales over the whole batch).
    """
    size = size or len(latents)
    full = (size, *latents.shape[1:])
    noise = _randn(full, latents, generator)
    if cfg.noise_offset:
        strength = offset_strength(cfg, latents, generator, rows, size)
        noise = noise + strength * _randn((size, latents.shape[1], 1, 1), latents, generator)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, cfg.multires_noise_iterations, cfg.multires_noise_discount)
    return noise[rows]


def timesteps(cfg: TrainConfig, batch: int, num_timesteps: int, generator: torch.Generator,
              device: torch.device) -> torch.Tensor:
    """One timestep per sample, uniform in [min_timestep, max_timestep) (kohya's range; the whole schedule when
    unset); min_timestep == max_timestep trains that one timestep."""
    low = 0 if cfg.min_timestep is None else cfg.min_timestep
    high = num_timesteps if cfg.max_timestep is None else min(cfg.max_timestep, num_timesteps)
    if low >= high:
        return torch.full((batch,), min(low, num_timesteps - 1), dtype=torch.long, device=device)
    return torch.randint(low, high, (batch,), generator=generator, device=device)


def perturbed(cfg: TrainConfig, noise: torch.Tensor, generator: torch.Generator,
              rows: slice = slice(None), size: int | None = None) -> torch.Tensor:
    """The noise that goes into the UNet's input: with ip_noise_gamma, ``noise + gamma * N(0, 1)`` (input
    perturbation, Ning et al. 2023, arXiv:2301.11706) while the target stays ``noise``; gamma is drawn in
    [0, ip_noise_gamma) per step with ip_noise_gamma_random_strength. ``rows``/``size`` as in training_noise."""
    if not cfg.ip_noise_gamma:
        return noise
    gamma: torch.Tensor | float = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        gamma = torch.rand(1, generator=generator, device=noise.device) * cfg.ip_noise_gamma
    return noise + gamma * _randn((size or len(noise), *noise.shape[1:]), noise, generator)[rows]
