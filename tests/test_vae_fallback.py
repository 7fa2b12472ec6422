"""A half-precision VAE that overflows (the SDXL VAE in fp16) still gives finite latents, and stays as it was."""

from __future__ import annotations

import copy

import torch
from conftest import state_hashes


def overflowing_in_fp16(bundle):
    """Scale the first conv so its activations pass fp16's 65504 while its weights still fit in fp16."""
    conv = bundle.vae.encoder.conv_in
    with torch.no_grad():
        conv.weight.mul_(6e4 / conv.weight.abs().max())
    return bundle


def test_fp16_overflow_is_encoded_again_in_fp32_and_the_vae_is_left_unchanged(tiny):
    reference = copy.deepcopy(overflowing_in_fp16(tiny))
    tiny.vae.half()
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        raw = tiny.vae.encode(pixels.half()).latent_dist.mean
    assert not torch.isfinite(raw).all()  # the overflow the fallback is for
    before = state_hashes(tiny.vae)
    params = [id(p) for p in tiny.vae.parameters()]

    latents = tiny.encode_images(pixels)

    assert torch.isfinite(latents).all()
    reference.vae.load_state_dict({k: v.float() for k, v in tiny.vae.state_dict().items()})
    torch.testing.assert_close(latents.float(), reference.encode_images(pixels).float(), atol=1e-3, rtol=1e-3)
    assert state_hashes(tiny.vae) == before
    assert [id(p) for p in tiny.vae.parameters()] == params  # the host's own tensors, still fp16
    assert all(p.dtype == torch.float16 for p in tiny.vae.parameters())
