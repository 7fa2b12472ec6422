"""The CLI's diffusers host: text conditioning per family, clip skip, parameterization choice."""

from __future__ import annotations

import torch

from lora_train.hosts.diffusers import _parameterization, sd_alphas_cumprod


def test_clip_skip_uses_the_penultimate_layer_through_the_final_norm(tiny):
    tokens = tiny.tokenize(["a red circle"])
    encoder = tiny.text_encoders[0]
    with torch.no_grad():
        last = tiny.encode_text(tokens).context
        tiny.clip_skip = 2
        skipped = tiny.encode_text(tokens).context
        hidden = encoder(tokens[0], output_hidden_states=True).hidden_states[-2]
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
