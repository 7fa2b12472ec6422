"""The CLI's diffusers host: text conditioning per family, clip skip, parameterization choice."""

from __future__ import annotations

import pytest
import torch

from lora_train.engine.output.weights import WeightsFileError
from lora_train.hosts.diffusers import _parameterization, load_folder, sd_alphas_cumprod


def test_clip_skip_uses_the_penultimate_layer_through_the_final_norm(tiny):
    tokens = tiny.tokenize(["a red circle"])
    encoder = tiny.text_encoders[0]
    with torch.no_grad():
        last = tiny.encode_text(tokens).context
        tiny.clip_skip = 2
        skipped = tiny.encode_text(tokens).context
        hidden = encoder(tokens.ids[0], output_hidden_states=True).hidden_states[-2]
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
    torch.testing.assert_close(skipped, final_norm(hidden))
    assert not torch.allclose(last, skipped)


def test_sdxl_conditioning_concatenates_both_encoders_and_pools_the_second(tiny_sdxl):
    cond = tiny_sdxl.encode_text(tiny_sdxl.tokenize(["a", "b c"]))
    widths = [e.config.hidden_size for e in tiny_sdxl.text_encoders]
    assert cond.context.shape == (2, 77, sum(widths))
    assert cond.pooled.shape == (2, tiny_sdxl.text_encoders[1].config.projection_dim)


def test_parameterization_user_setting_wins_then_model_config():
    assert _parameterization(None, False) == "eps"
    assert _parameterization(None, True) == "v"
    assert _parameterization(False, True) == "eps"
    assert _parameterization(True, False) == "v"


def test_schedule_is_sd_scaled_linear():
    alphas = sd_alphas_cumprod()
    assert alphas.shape == (1000,)
    assert abs(float(alphas[0]) - (1 - 0.00085)) < 1e-6
    assert float(alphas[-1]) < 0.005


def save_folder(bundle, folder):
    for name, module in (("unet", bundle.unet), ("vae", bundle.vae), ("text_encoder", bundle.text_encoders[0])):
        module.save_pretrained(folder / name)
    return folder


def test_diffusers_folder_trains_on_its_own_schedule(tiny, tmp_path):
    from diffusers import DDPMScheduler

    folder = save_folder(tiny, tmp_path / "model")
    assert torch.equal(load_folder(folder).alphas_cumprod, sd_alphas_cumprod())  # no scheduler/: SD's default
    zero_snr = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             prediction_type="v_prediction", rescale_betas_zero_snr=True)
    zero_snr.save_pretrained(folder / "scheduler")
    bundle = load_folder(folder)
    assert bundle.parameterization == "v"
    torch.testing.assert_close(bundle.alphas_cumprod, zero_snr.alphas_cumprod)
    assert float(bundle.alphas_cumprod[-1]) == 0.0  # zero terminal SNR, unlike SD's default
    linear = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    linear.save_pretrained(folder / "scheduler")
    bundle = load_folder(folder)
    assert bundle.parameterization == "eps"
    torch.testing.assert_close(bundle.alphas_cumprod, linear.alphas_cumprod)
    assert load_folder(folder, v_parameterization=True).parameterization == "v"  # the user's setting wins


def test_folder_with_an_unsupported_prediction_type_is_named(tiny, tmp_path):
    from diffusers import DDPMScheduler

    folder = save_folder(tiny, tmp_path / "model")
    DDPMScheduler(prediction_type="sample").save_pretrained(folder / "scheduler")
    with pytest.raises(WeightsFileError, match=r"scheduler: prediction_type 'sample' is not supported"):
        load_folder(folder)
