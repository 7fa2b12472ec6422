"""Validation loss on held-out images, with the same draws every time so its curve can be compared.

The training loss is noise: every step draws new timesteps and noise. Here each held-out image is noised at
kohya's fixed timesteps (4 evenly spaced inside the schedule: 200, 400, 600, 800 of 1000) with noise seeded
from (validation_seed, image, timestep), so two validations of the same weights give the same number and a
lower number means the LoRA predicts unseen images better. It never draws from the global random generators,
so a run with validation trains exactly the weights a run without it would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data.caches import LatentCache, TextCache
from lora_train.engine.data.dataset import Dataset
from lora_train.engine.model import ModelBundle
from lora_train.engine.network.module_flags import ModuleFlags
from lora_train.engine.train.loss import add_noise, autocast, loss_target, min_snr_weights

TIMESTEPS = 4  # kohya's NUM_VALIDATION_TIMESTEPS


def fixed_timesteps(num_train_timesteps: int) -> list[int]:
    """kohya's validation timesteps: evenly spaced, both ends left out."""
    return [int(t) for t in np.linspace(0, num_train_timesteps, TIMESTEPS + 2, dtype=int)[1:-1]]


@dataclass
class ValidationHistory:
    """Every validation (step, loss) of a run, and its best point."""

    points: list[tuple[int, float]] = field(default_factory=list)

    @property
    def best(self) -> tuple[int, float] | None:
        return min(self.points, key=lambda p: p[1]) if self.points else None

    def summary(self) -> str:
        best = self.best
        return f"best at step {best[0]} ({best[1]:.4f})" if best else "no validation yet"


class Validator:
    """Validation of the LoRA being trained on ``held_out`` (a ``split.split_validation`` result)."""

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, held_out: Dataset, text: TextCache, work_dir: Path,
                 alphas: torch.Tensor | None = None):
        """``alphas``: the noise schedule training uses (default: the model's own)."""
        self.cfg, self.bundle, self.dataset, self.text = cfg, bundle, held_out, text
        self.alphas = alphas if alphas is not None else bundle.alphas_cumprod
        self.latents = LatentCache(cfg, bundle, held_out, work_dir)
        self.seed = cfg.validation_seed if cfg.validation_seed is not None else cfg.seed
        self.timesteps = fixed_timesteps(len(self.alphas))
        self.batches = self._batches()
        self.history = ValidationHistory()

    def _batches(self) -> list[list[int]]:
        """Held-out items in a fixed order, one bucket per batch, at most ``max_validation_steps`` batches."""
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.dataset.items):
            by_bucket.setdefault(item.bucket, []).append(index)
        size = self.cfg.batch_size
        batches = [indices[i : i + size] for bucket in sorted(by_bucket) for indices in [by_bucket[bucket]]
                   for i in range(0, len(indices), size)]
        return batches[: self.cfg.max_validation_steps] if self.cfg.max_validation_steps else batches

    @property
    def images(self) -> list[Path]:
        """The held-out files (shown to the user: these are never trained on)."""
        return [item.path for item in self.dataset.items]

    def due(self, step: int, epoch_ended: int | None) -> bool:
        """kohya's rule: every ``validate_every_n_steps`` steps, and at the end of every
        ``validate_every_n_epochs``-th epoch (every epoch when unset)."""
        cfg = self.cfg
        if cfg.validate_every_n_steps and step % cfg.validate_every_n_steps == 0:
            return True
        return epoch_ended is not None and epoch_ended % (cfg.validate_every_n_epochs or 1) == 0

    def cache(self, should_stop, log) -> bool:
        return self.latents.cache_all(should_stop, log)

    def close(self) -> None:
        self.latents.close()

    def run(self, step: int) -> float:
        """Validate now, record (step, loss) and return the loss."""
        modules = [self.bundle.unet, *self.bundle.text_encoders]
        modes = ModuleFlags.capture(modules)
        for module in modules:
            module.eval()  # no LoRA dropout
        try:
            loss = self.loss()
        finally:
            modes.restore()
        self.history.points.append((step, loss))
        return loss

    @torch.no_grad()
    def loss(self) -> float:
        """Mean loss over the held-out images and the fixed timesteps (one host-device sync)."""
        bundle, device = self.bundle, self.bundle.device
        alphas = self.alphas.to(device)
        total = torch.zeros((), device=device)
        count = 0
        for indices in self.batches:
            latents = self.latents.encode(indices)
            cond = self.text.encode([self.dataset.items[i].caption for i in indices])
            if cond.pooled is not None:
                cond.size_ids = self.latents.size_ids(indices)
            for timestep in self.timesteps:
                noise = torch.stack([self._noise(i, timestep, latents.shape[1:]) for i in indices])
                timesteps = torch.full((len(indices),), timestep, device=device, dtype=torch.long)
                noisy = add_noise(latents, noise, timesteps, alphas)
                with autocast(self.cfg, device):
                    prediction = bundle.predict(noisy.to(bundle.dtype), timesteps, cond)
                target = loss_target(bundle.parameterization, latents, noise, timesteps, alphas)
                loss = torch.nn.functional.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
                if self.cfg.min_snr_gamma:
                    loss = loss * min_snr_weights(timesteps, alphas, self.cfg.min_snr_gamma, bundle.parameterization)
                total += loss.sum()
                count += len(indices)
        return total.item() / max(count, 1)

    def _noise(self, index: int, timestep: int, shape: torch.Size) -> torch.Tensor:
        """The same noise for this image and timestep at every validation (drawn on the CPU: same on any device)."""
        generator = torch.Generator("cpu").manual_seed(self.seed * 1_000_003 + index * 1009 + timestep)
        return torch.randn(shape, generator=generator).to(self.bundle.device)
