"""The parts of the loss kohya sd-scripts lets a config choose, with its keys' meanings: the per-element loss
(l2, l1, scheduled pseudo-Huber), debiased estimation weights and the loss mask.

Pure functions of tensors, so each is checked against its paper's formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.model import Parameterization

_SNR_CAP = 1000.0  # kohya caps the SNR of t=0 (nearly infinite) at 1000 for debiased estimation


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each timestep."""
    alpha = alphas_cumprod[timesteps]
    return alpha / (1 - alpha)


def huber_threshold(cfg: TrainConfig, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor | None:
    """The pseudo-Huber threshold c per sample for ``huber``/``smooth_l1`` (Khrapov et al. 2024,
    arXiv:2403.16728, as kohya schedules it); None for the other loss types.

    ``constant``: huber_c x huber_scale. ``exponential``: huber_c^(t/T) x huber_scale (1 at t=0, huber_c at T).
    ``snr``: (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t = sqrt((1 - alpha_bar) / alpha_bar); kohya
    applies no huber_scale there.
    """
    if cfg.loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.float()
    if cfg.huber_schedule == "constant":
        return torch.full_like(t, cfg.huber_c * cfg.huber_scale)
    if cfg.huber_schedule == "exponential":
        decay = -math.log(cfg.huber_c) / len(alphas_cumprod)
        return torch.exp(-decay * t) * cfg.huber_scale
    alpha = alphas_cumprod[timesteps].float()
    sigma = ((1 - alpha) / alpha).sqrt()
    return (1 - cfg.huber_c) / (1 + sigma) ** 2 + cfg.huber_c


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element, not reduced. ``huber``: 2c(sqrt(d^2 + c^2) - c); ``smooth_l1``:
    2(sqrt(d^2 + c^2) - c), with c per sample. Both are computed as 2c d^2 / (sqrt(d^2 + c^2) + c) (the same
    value without the cancellation), so a huge c gives exactly l2 and not float32's rounding noise."""
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs a Huber threshold")
    c = huber_c.view(-1, *([1] * (prediction.ndim - 1)))
    squared = (prediction - target) ** 2
    excess = squared / ((squared + c**2).sqrt() + c)  # = sqrt(d^2 + c^2) - c
    return 2 * c * excess if loss_type == "huber" else 2 * excess


def debiased_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                     parameterization: Parameterization) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024, arXiv:2310.08442): 1/sqrt(SNR) per sample, 1/(SNR + 1) for
    v-prediction, the SNR capped at 1000 as kohya does."""
    ratio = torch.clamp(snr(timesteps, alphas_cumprod), max=_SNR_CAP)
    return 1 / (ratio + 1) if parameterization == "v" else 1 / ratio.sqrt()


def masked(loss: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """The element loss times the mask ([batch, 1, h, w] at the latents' size, 1 = train, 0 = ignore). Like
    kohya, the mean that follows still divides by every element: a half-masked image weighs half."""
    return loss if masks is None else loss * masks
