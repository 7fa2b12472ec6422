"""The noise schedule a run trains on, and kohya's v-prediction loss scalings.

- ``zero_terminal_snr``: Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed",
  Algorithm 1): shift and scale sqrt(alpha_bar) so the last step is pure noise and the first is unchanged. The
  last alpha_bar is then set to 4.8973451890853435e-08 instead of 0, as the WebUI's
  ``rescale_zero_terminal_snr_abar`` does (its "Noise schedule for sampling: Zero Terminal SNR"), so the SNR
  weightings stay finite and training sees the schedule generation samples with.
- ``scale_v_pred_loss_like_noise_pred`` and ``v_pred_like_loss``: kohya's ``custom_train_functions``, with the
  SNR clamped to 1000 as kohya does (t = 0 would be infinite).
"""

from __future__ import annotations

import torch

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.model import ModelBundle

TERMINAL_ALPHA_BAR = 4.8973451890853435e-08  # the WebUI's (and NoobAI's) stand-in for exactly zero
SNR_LIMIT = 1000.0


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """alpha_bar with zero terminal SNR (first step kept), computed in float64."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    rescaled = root**2
    rescaled[-1] = TERMINAL_ALPHA_BAR
    return rescaled.to(alphas_cumprod.dtype)


def wants_zero_terminal_snr(cfg: TrainConfig, bundle: ModelBundle) -> bool:
    """The config's choice; unset, what the host or checkpoint declares (the WebUI's noise schedule setting, a
    checkpoint's ``ztsnr`` key), else off."""
    if cfg.zero_terminal_snr is not None:
        return cfg.zero_terminal_snr
    return bool(getattr(bundle, "zero_terminal_snr", False))


def training_alphas(cfg: TrainConfig, bundle: ModelBundle, device: torch.device) -> torch.Tensor:
    """The alpha_bar schedule the loss samples from."""
    alphas = bundle.alphas_cumprod
    if wants_zero_terminal_snr(cfg, bundle):
        alphas = rescale_zero_terminal_snr(alphas)
    return alphas.to(device)


def snr_scale(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """kohya's get_snr_scale: SNR / (SNR + 1), the SNR clamped to 1000."""
    alpha = alphas_cumprod[timesteps].float()
    snr = torch.clamp(alpha / (1 - alpha), max=SNR_LIMIT)
    return snr / (snr + 1)


def v_prediction_scalings(cfg: TrainConfig, loss: torch.Tensor, timesteps: torch.Tensor,
                          alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample loss after kohya's scale_v_pred_loss_like_noise_pred and v_pred_like_loss (in that order)."""
    if cfg.scale_v_pred_loss_like_noise_pred:
        loss = loss * snr_scale(timesteps, alphas_cumprod)
    if cfg.v_pred_like_loss:
        loss = loss + loss / snr_scale(timesteps, alphas_cumprod) * cfg.v_pred_like_loss
    return loss
