"""Sample images during training with any ModelBundle: DDIM with classifier-free guidance.

diffusers' DDIMScheduler does the stepping; the schedule is rebuilt from the bundle's own alphas so the
WebUI's model and a diffusers model are sampled the same way. (Inside the WebUI the tab may pass its own
sampler instead, so previews match txt2img.)
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from PIL import Image

from lora_train.engine.model import Conditioning, ModelBundle

PREVIEW_CHUNKS = 3  # sample prompts up to 225 tokens, chunked and emphasised as the WebUI does by default


def _scheduler(bundle: ModelBundle) -> DDIMScheduler:
    alphas_cumprod = bundle.alphas_cumprod.double().cpu()
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = (1 - alphas_cumprod / previous).float()
    return DDIMScheduler(
        num_train_timesteps=len(betas), trained_betas=betas.numpy(), clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="v_prediction" if bundle.parameterization == "v" else "epsilon",
    )


def _size_ids(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device).repeat(batch, 1)


@torch.no_grad()
def sample_images(
    bundle: ModelBundle, prompts: list[str], height: int, width: int, steps: int = 20, cfg_scale: float = 7.0,
    seed: int = 0, negative: str = "",
) -> list[Image.Image]:
    """One image per prompt, seeded so previews at different steps are comparable."""
    scheduler = _scheduler(bundle)
    scheduler.set_timesteps(steps)
    device = bundle.device
    images = []
    for index, prompt in enumerate(prompts):
        cond = bundle.encode_text(bundle.tokenize([negative, prompt], max_chunks=PREVIEW_CHUNKS, weighted=True))
        if cond.pooled is not None:
            cond = Conditioning(cond.context, cond.pooled, _size_ids(2, height, width, device))
        generator = torch.Generator("cpu").manual_seed(seed + index)
        latents = torch.randn((1, 4, height // 8, width // 8), generator=generator).to(device, torch.float32)
        for t in scheduler.timesteps:
            timesteps = torch.full((2,), int(t), device=device, dtype=torch.long)
            output = bundle.predict(torch.cat([latents] * 2).to(bundle.dtype), timesteps, cond).float()
            uncond, text = output.chunk(2)
            latents = scheduler.step(uncond + cfg_scale * (text - uncond), t, latents).prev_sample
        pixels = bundle.decode_latents(latents).float().clamp(-1, 1)
        array = ((pixels[0].permute(1, 2, 0).cpu() + 1) * 127.5).round().byte().numpy()
        images.append(Image.fromarray(array))
    return images
