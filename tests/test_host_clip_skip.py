"""Unset keys train as the WebUI generates. Clip skip: the layer of its "Clip skip" (``CLIP_stop_at_last_layers``;
SDXL's CLIP-L with "Clip skip SDXL"), shown in the tab and recorded. Zero terminal SNR: its "Noise schedule for
sampling".

The oracles are the bare HF CLIP transformer's hidden states (as A1111's ``sd_hijack_clip`` picks them) and
diffusers' zero-terminal-SNR betas; the real WebUI's own ``get_learned_conditioning`` is compared in
tests/webui/test_conditioning.py.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (requirements/ldm-test.txt)")
pytest.importorskip("pytorch_lightning", reason="needs pytorch_lightning<2 (requirements/ldm-test.txt)")

import ldm_models as M  # noqa: E402
import torch  # noqa: E402

from lora_train.engine.config.checks import ConfigError  # noqa: E402
from lora_train.engine.config.settings import TrainConfig  # noqa: E402
from lora_train.engine.train.schedules import training_alphas  # noqa: E402
from lora_train.webui.a1111 import WebUIHost  # noqa: E402

CAPTION = ["a photo of a red cat"]


def _host(model, clip_skip: int, sdxl_clip_l_skip: bool = False, schedule: str = "Default") -> WebUIHost:
    opts = SimpleNamespace(CLIP_stop_at_last_layers=clip_skip, sdxl_clip_l_skip=sdxl_clip_l_skip,
                           sd_noise_schedule=schedule)
    return WebUIHost(SimpleNamespace(sd_model=model, opts=opts, state=SimpleNamespace()), queue_lock=None)


@pytest.mark.parametrize("webui_skip", [1, 2, 3])
def test_unset_clip_skip_follows_the_webuis_setting_on_sd1(webui_skip):
    model = M.tiny_sd1()
    host = _host(model, webui_skip)
    bundle = host._bundle(TrainConfig())
    transformer = model.cond_stage_model.wrapped.transformer
    tokens = bundle.tokenize(CAPTION)
    with torch.no_grad():
        out = transformer(tokens.ids[0], output_hidden_states=True)
        expected = out.last_hidden_state if webui_skip == 1 else \
            transformer.text_model.final_layer_norm(out.hidden_states[-webui_skip])
        torch.testing.assert_close(bundle.encode_text(tokens).context, expected)
    assert f"now {webui_skip}" in host.generation_notes()["clip_skip"]
    # an explicit value wins over the WebUI's
    assert host._bundle(TrainConfig(clip_skip=1)).clip_skip == 1


def test_sdxl_clip_l_follows_clip_skip_only_with_the_webuis_clip_skip_sdxl():
    model = M.tiny_sdxl()
    clip_l = model.conditioner.embedders[0].wrapped
    off = _host(model, 3)._bundle(TrainConfig())
    on = _host(model, 3, sdxl_clip_l_skip=True)._bundle(TrainConfig())
    tokens = on.tokenize(CAPTION)
    width = clip_l.transformer.config.hidden_size
    with torch.no_grad():
        hidden = clip_l.transformer(tokens.ids[0], output_hidden_states=True).hidden_states
        torch.testing.assert_close(on.encode_text(tokens).context[..., :width], hidden[-3])  # no final norm
        torch.testing.assert_close(off.encode_text(tokens).context[..., :width], hidden[clip_l.layer_idx])
    assert "follows it" in _host(model, 3, True).generation_notes()["clip_skip"]


def test_clip_skip_takes_the_webuis_range():
    assert TrainConfig(clip_skip=12).clip_skip == 12
    for bad in (0, 13):
        with pytest.raises(ConfigError, match="clip_skip"):
            TrainConfig(clip_skip=bad)


def test_unset_zero_terminal_snr_follows_the_webuis_noise_schedule():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    model = M.tiny_sd2()
    betas = torch.as_tensor(model.betas, dtype=torch.float64)
    expected = torch.cumprod(1 - rescale_zero_terminal_snr(betas), dim=0)  # Lin et al., Algorithm 1
    host = _host(model, 1, schedule="Zero Terminal SNR")
    alphas = training_alphas(TrainConfig(), host._bundle(TrainConfig()), torch.device("cpu")).double()
    torch.testing.assert_close(alphas[:-1], expected[:-1], rtol=1e-5, atol=1e-8)
    assert alphas[-1] < 1e-7 and "Zero Terminal SNR" in host.generation_notes()["zero_terminal_snr"]
    default = _host(model, 1)
    assert training_alphas(TrainConfig(), default._bundle(TrainConfig()), torch.device("cpu"))[-1] > 1e-3
    off = TrainConfig(zero_terminal_snr=False)
    assert training_alphas(off, host._bundle(off), torch.device("cpu"))[-1] > 1e-3


def test_a_checkpoint_the_webui_cannot_load_does_not_take_the_tab_down():
    """A1111 loads the checkpoint on first access of ``shared.sd_model``; seen failing on CPU for an fp16 SD2-v
    file (its own v-prediction probe mixes dtypes). The tab's family/device questions must still answer."""

    class Shared:
        opts = SimpleNamespace()

        @property
        def sd_model(self):
            raise RuntimeError("Input type (float) and bias type (c10::Half) should be the same")

    host = WebUIHost(Shared(), queue_lock=None)
    assert host.family() is None and host.device_type() in ("cpu", "cuda", "mps", "xpu")
