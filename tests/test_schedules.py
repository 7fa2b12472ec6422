"""Noise schedule and kohya's v-prediction loss options, against diffusers' primitives and kohya's formulas.

Oracles: diffusers' ``rescale_zero_terminal_snr`` (Lin et al. 2023, Algorithm 1, on betas) and the SNR
scalings written out from kohya's custom_train_functions (SNR = alpha_bar / (1 - alpha_bar), clamped to 1000).
"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from lora_train.engine.train.loss import diffusion_loss
from lora_train.engine.train.schedules import rescale_zero_terminal_snr, training_alphas
from lora_train.hosts.diffusers import sd_alphas_cumprod
from tests.conftest import make_config


def _sd_betas() -> torch.Tensor:
    return torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2


def test_zero_terminal_snr_is_the_papers_schedule_with_the_webuis_last_step():
    expected = torch.cumprod(1 - diffusers_rescale(_sd_betas()), dim=0)
    ours = rescale_zero_terminal_snr(torch.cumprod(1 - _sd_betas(), dim=0))
    torch.testing.assert_close(ours[:-1], expected[:-1], rtol=1e-9, atol=1e-12)
    assert expected[-1] == 0 and ours[-1] == 4.8973451890853435e-08  # finite SNR, as the WebUI samples it
    assert ours[0] == torch.cumprod(1 - _sd_betas(), dim=0)[0]


def test_unset_follows_what_the_model_or_host_declares(tiny):
    plain = sd_alphas_cumprod()
    assert torch.equal(training_alphas(make_config(".", "."), tiny, torch.device("cpu")), plain)
    tiny.zero_terminal_snr = True  # a checkpoint's ztsnr key, or the WebUI's noise schedule setting
    rescaled = training_alphas(make_config(".", "."), tiny, torch.device("cpu"))
    assert rescaled[-1] < 1e-7 and torch.equal(rescaled, rescale_zero_terminal_snr(plain))
    assert torch.equal(training_alphas(make_config(".", ".", zero_terminal_snr=False), tiny, torch.device("cpu")),
                       plain)


def _per_sample_loss(cfg, bundle, latents, cond, alphas, seed):
    """diffusion_loss with a batch of one sample: the mean is that sample's loss."""
    return diffusion_loss(cfg, bundle, latents, cond, alphas, torch.Generator().manual_seed(seed))


def test_kohyas_v_prediction_scalings(tiny):
    alphas = sd_alphas_cumprod()
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        cond = tiny.encode_text(tiny.tokenize(["a red circle"]))
        tiny.parameterization = "v"
        base = _per_sample_loss(make_config(".", "."), tiny, latents, cond, alphas, 3)
        scaled = _per_sample_loss(make_config(".", ".", scale_v_pred_loss_like_noise_pred=True), tiny, latents, cond,
                                  alphas, 3)
        tiny.parameterization = "eps"
        eps = _per_sample_loss(make_config(".", "."), tiny, latents, cond, alphas, 3)
        v_like = _per_sample_loss(make_config(".", ".", v_pred_like_loss=0.2), tiny, latents, cond, alphas, 3)
    generator = torch.Generator().manual_seed(3)  # the loss' own draws: the noise, then the timestep
    torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (1,), generator=generator)
    snr = torch.clamp(alphas[t] / (1 - alphas[t]), max=1000)
    torch.testing.assert_close(scaled, base * (snr / (snr + 1)).squeeze())
    torch.testing.assert_close(v_like, eps + eps * ((snr + 1) / snr).squeeze() * 0.2)
