"""What every benchmark shares: the mid-size model, a synthetic dataset, a step clock for our trainer, and the
bare diffusers + peft + torch AdamW reference loop our trainer is compared with.

The reference is written here from diffusers' and peft's public APIs only (no lora_train code in its hot
path), so a slowdown in our engine cannot hide by also slowing the baseline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

from lora_train.engine.config.settings import TrainConfig  # noqa: E402
from lora_train.engine.train.progress import TrainCallbacks  # noqa: E402
from lora_train.engine.train.trainer import Trainer  # noqa: E402
from lora_train.hosts.architectures import SD1, TINY, Architecture  # noqa: E402

# kohya's default UNet targets (Linear / 1x1 conv inside every transformer block), as a peft regex.
UNET_TARGETS = r".*attentions\.\d+\..*(proj_in|proj_out|to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2)$"


def mid_arch(cross_attention_dim: int = 768) -> Architecture:
    """SD1's UNet layout at a quarter of its width: big enough that the UNet dominates a CPU step.

    The VAE and text encoder are the tiny ones: both only run while caching, which cpu_step.py does not time.
    """
    unet = {
        **SD1.unet, "sample_size": 32, "block_out_channels": [64, 128, 128, 128],
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": 8,
    }
    text = {**TINY.text_encoders[0], "hidden_size": cross_attention_dim, "intermediate_size": 2 * cross_attention_dim,
            "num_attention_heads": 8, "projection_dim": cross_attention_dim}
    return dataclasses.replace(SD1, unet=unet, vae=TINY.vae, text_encoders=[text], resolution=256)


def make_dataset(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` smooth random RGB images of ``size``² with distinct captions (so the text cache has ``count``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        image.save(folder / f"img{index:03d}.png")
        (folder / f"img{index:03d}.txt").write_text(f"bench subject {index}, colour field, detailed")
    return folder


def bench_config(data_dir: Path, out_dir: Path, resolution: int, **overrides) -> TrainConfig:
    """A plain LoRA run: rank 8 / alpha 16, AdamW, constant LR, grad-norm clip 1.0, cached latents."""
    values: dict = dict(
        train_data_dir=str(data_dir), output_dir=str(out_dir), output_name="bench", overwrite=True,
        resolution=str(resolution), enable_bucket=False, lora_rank=8, lora_alpha=16.0, learning_rate=1e-4,
        batch_size=2, max_train_steps=10, log_every_n_steps=10, save_precision="fp16",
    )
    values.update(overrides)
    return TrainConfig(**values)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast, or nothing for full precision (autocast refuses dtype=None on some devices)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- our trainer
class StepClock(TrainCallbacks):
    """Time stamps at the top of loop iterations ``warmup`` and ``warmup + steps``.

    ``should_stop`` is the first thing each iteration of Trainer._loop calls, so the window between the two
    stamps is exactly ``steps`` whole iterations: batch pick, cached-latent and text lookups, noise, forward,
    backward, clip, optimizer, scheduler and the periodic loss report. Setup, latent caching and export fall
    outside it.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.marks = (warmup, warmup + steps)
        self.device = device
        self.calls = 0
        self.stamps: list[float] = []

    def should_stop(self) -> bool:
        if self.calls in self.marks:
            synchronize(self.device)
            self.stamps.append(time.perf_counter())
        self.calls += 1
        return False

    @property
    def seconds(self) -> float:
        return self.stamps[1] - self.stamps[0]


def run_ours(cfg: TrainConfig, bundle, warmup: int, steps: int) -> tuple[float, Trainer]:
    """Seconds per step of our Trainer over ``steps`` steps after ``warmup``; returns the Trainer for its caches."""
    cfg = dataclasses.replace(cfg, max_train_steps=warmup + steps + 1)
    clock = StepClock(warmup, steps, bundle.device)
    trainer = Trainer(cfg, bundle, clock)
    trainer.run()
    return clock.seconds / steps, trainer


# ----------------------------------------------------------------------------------------- reference
@dataclass
class CachedItem:
    """One training sample as a bare script caches it: latent, text context and SDXL's extra vectors."""

    latent: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor | None = None
    size_ids: torch.Tensor | None = None


def cached_items(trainer: Trainer, device: torch.device) -> list[CachedItem]:
    """The very latents and text embeddings our trainer cached, moved to ``device`` once."""
    items = []
    for index, item in enumerate(trainer.dataset.items):
        cond = trainer.text.cache.get(item.caption)
        if cond is None:  # a short run may not have reached every caption yet
            with torch.no_grad():
                cond = trainer.bundle.encode_text(trainer.bundle.tokenize([item.caption]))
        pooled = cond.pooled[0].to(device) if cond.pooled is not None else None
        size_ids = torch.tensor(item.size_ids(), dtype=torch.float32, device=device) if pooled is not None else None
        items.append(CachedItem(trainer.latents.memory[index].to(device), cond.context[0].to(device), pooled, size_ids))
    return items


def inject_lora(unet: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """peft LoRA on kohya's targets; adapters in fp32 whatever the UNet's dtype (as diffusers' examples do)."""
    unet.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=UNET_TARGETS), unet)
    params = [p for name, p in unet.named_parameters() if "lora_" in name]
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    return params


def remove_lora(unet: nn.Module) -> None:
    """Put the original modules back so the next run starts from the same UNet."""
    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, module.get_base_layer())
    unet.__dict__.pop("peft_config", None)


class ReferenceLoop:
    """The bare loop: diffusers UNet, peft LoRA, torch AdamW (foreach) or bitsandbytes AdamW8bit, MSE on noise.

    Same batch size, same cached tensors, same clip and constant LR schedule as our default config; only what
    a hand-written script would do each step, with everything already on the device.
    """

    def __init__(self, unet: nn.Module, items: list[CachedItem], batch_size: int, rank: int = 8,
                 alpha: float = 16.0, lr: float = 1e-4, max_grad_norm: float = 1.0, precision: str = "no",
                 gradient_checkpointing: bool = False, optimizer: str = "adamw"):
        self.unet, self.items, self.batch_size = unet, items, batch_size
        self.rank, self.alpha, self.lr, self.max_grad_norm = rank, alpha, lr, max_grad_norm
        self.precision, self.gradient_checkpointing, self.optimizer = precision, gradient_checkpointing, optimizer
        self.device = next(unet.parameters()).device
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas = torch.cumprod(1.0 - betas, dim=0).float().to(self.device)

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "adamw8bit":
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(params, lr=self.lr, weight_decay=1e-2)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=1e-2, foreach=True)

    def _batch(self, step: int) -> list[CachedItem]:
        start = (step * self.batch_size) % len(self.items)
        return [self.items[(start + i) % len(self.items)] for i in range(self.batch_size)]

    def run(self, warmup: int, steps: int) -> float:
        """Seconds per step over ``steps`` steps after ``warmup`` (fresh LoRA and optimizer each call)."""
        unet = self.unet
        params = inject_lora(unet, self.rank, self.alpha)
        optimizer = self._make_optimizer(params)
        scheduler = get_scheduler("constant", optimizer)
        fp16 = self.precision == "fp16"
        scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train(self.gradient_checkpointing)
        stamps = []
        try:
            for step in range(warmup + steps + 1):
                if step in (warmup, warmup + steps):
                    synchronize(self.device)
                    stamps.append(time.perf_counter())
                if step == warmup + steps:
                    break
                batch = self._batch(step)
                latents = torch.stack([b.latent for b in batch])
                context = torch.stack([b.context for b in batch]).to(dtype)
                extra = {}
                if batch[0].pooled is not None:
                    extra["added_cond_kwargs"] = {"text_embeds": torch.stack([b.pooled for b in batch]).to(dtype),
                                                  "time_ids": torch.stack([b.size_ids for b in batch]).to(dtype)}
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, 1000, (len(batch),), device=self.device)
                alpha = self.alphas[timesteps].view(-1, 1, 1, 1)
                noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
                with autocast(self.device, autocast_dtype):
                    prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=context, **extra).sample
                loss = torch.nn.functional.mse_loss(prediction.float(), noise)
                scaler.scale(loss).backward()
                if self.max_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            if self.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
            unet.eval()
            remove_lora(unet)
        return (stamps[1] - stamps[0]) / steps


# ----------------------------------------------------------------------------------------- A/B timing
@dataclass
class Comparison:
    ours: list[float]
    reference: list[float]

    @property
    def ratio(self) -> float:
        """Median of the per-pair ratios: each pair ran back to back, so slow drift cancels."""
        return statistics.median(o / r for o, r in zip(self.ours, self.reference, strict=True))

    @staticmethod
    def describe(values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return f"{statistics.median(ms):8.1f} ({min(ms):.1f}-{max(ms):.1f})"


def alternate(ours: Callable[[], float], reference: Callable[[], float], repeats: int) -> Comparison:
    """A/B, B/A, A/B, ...: each repeat runs both, starting with the other one than last time."""
    result = Comparison([], [])
    for repeat in range(repeats):
        if repeat % 2 == 0:
            result.ours.append(ours())
            result.reference.append(reference())
        else:
            result.reference.append(reference())
            result.ours.append(ours())
        print(f"  repeat {repeat + 1}/{repeats}: ours {1000 * result.ours[-1]:.1f} ms/step, reference "
              f"{1000 * result.reference[-1]:.1f} ms/step, ratio {result.ours[-1] / result.reference[-1]:.3f}",
              flush=True)
    return result


# ----------------------------------------------------------------------------------------- FLOPs
def _sdpa_shapes(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_shapes(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def _cpu_sdpa_mapping() -> dict:
    """CPU SDPA runs as ``_scaled_dot_product_flash_attention_for_cpu``, which torch's FLOP table lacks."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_shapes
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_backward_shapes
    return mapping


def train_step_flops(unet: nn.Module, batch_size: int, latent_size: int, context_dim: int,
                     autocast_dtype: torch.dtype | None = None, rank: int = 8) -> int:
    """FLOPs of one LoRA training forward + backward (input grads through the frozen UNet, LoRA weight grads)."""
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    config = unet.config
    params = inject_lora(unet, rank, 2.0 * rank)
    try:
        latents = torch.randn(batch_size, config.in_channels, latent_size, latent_size, device=device, dtype=dtype)
        context = torch.randn(batch_size, 77, context_dim, device=device, dtype=dtype)
        timesteps = torch.randint(0, 1000, (batch_size,), device=device)
        extra = {}
        if config.addition_embed_type == "text_time":
            pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            pooled = torch.randn(batch_size, pooled_dim, device=device, dtype=dtype)
            time_ids = torch.randn(batch_size, 6, device=device, dtype=dtype)
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        with flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
            with autocast(device, autocast_dtype):
                prediction = unet(latents, timesteps, encoder_hidden_states=context, **extra).sample
            prediction.float().pow(2).mean().backward()
        return int(counter.get_total_flops())
    finally:
        for param in params:
            param.grad = None
        remove_lora(unet)
