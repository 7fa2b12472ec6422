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
from lora_train.engine.train.progress import StepInfo, TrainCallbacks  # noqa: E402
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
class MeasurementError(RuntimeError):
    """The benchmark measured something else than it says (a window without exactly N optimizer steps, or a
    ratio no real difference could give): a broken measurement, not a result."""


@dataclass
class Stamp:
    """One instant on two clocks: wall time, and CPU time of this process (all its threads), which a machine
    shared with other jobs inflates far less."""

    wall: float
    cpu: float

    @staticmethod
    def now(device: torch.device) -> Stamp:
        synchronize(device)
        return Stamp(time.perf_counter(), time.process_time())


@dataclass
class Timing:
    """Seconds per optimizer step over a window, on both clocks."""

    wall: float
    cpu: float

    @staticmethod
    def between(start: Stamp, end: Stamp, steps: int) -> Timing:
        return Timing((end.wall - start.wall) / steps, (end.cpu - start.cpu) / steps)


class WindowHooks:
    """What runs at the two ends of a timed window (a profiler, a memory-peak reset); nothing by default."""

    def at_window_start(self) -> None:
        """Called right after the first stamp."""

    def at_window_end(self) -> None:
        """Called right before the second stamp."""


class StepClock(TrainCallbacks, WindowHooks):
    """Stamps after optimizer steps ``warmup`` and ``warmup + steps``, taken in ``on_step``.

    ``on_step`` runs once per optimizer step, after the optimizer and scheduler stepped and the loss was read
    (when due), so the window between the stamps holds optimizer steps ``warmup+1 .. warmup+steps``: batch
    pick, cached-latent and text lookups, noise, forward, backward, clip, optimizer, scheduler, the periodic
    loss read. ``should_stop`` cannot count steps: latent caching also calls it once per image. The clock
    records the step numbers it saw inside the window and ``timing`` refuses a window that does not hold
    exactly ``steps`` of them (MeasurementError).
    """

    def __init__(self, warmup: int, steps: int, device: torch.device):
        if warmup < 1 or steps < 1:
            raise ValueError("the window starts after optimizer step `warmup`: warmup and steps must be >= 1")
        self.marks = (warmup, warmup + steps)
        self.steps = steps
        self.device = device
        self.stamps: list[Stamp] = []
        self.window_steps: list[int] = []

    def on_step(self, info: StepInfo) -> None:
        if len(self.stamps) == 1:
            self.window_steps.append(info.step)
        if info.step in self.marks:
            if info.step == self.marks[1]:
                self.at_window_end()
            self.stamps.append(Stamp.now(self.device))
            if info.step == self.marks[0]:
                self.at_window_start()

    @property
    def timing(self) -> Timing:
        expected = list(range(self.marks[0] + 1, self.marks[1] + 1))
        if len(self.stamps) != 2 or self.window_steps != expected:
            raise MeasurementError(f"the timed window held optimizer steps {self.window_steps} (stamps: "
                                   f"{len(self.stamps)}), not exactly {self.steps} ({expected[0]}..{expected[-1]})")
        return Timing.between(self.stamps[0], self.stamps[1], self.steps)

    @property
    def seconds(self) -> float:
        """Wall seconds of the whole window."""
        return self.timing.wall * self.steps


def run_ours(cfg: TrainConfig, bundle, warmup: int, steps: int, hooks: WindowHooks | None = None,
             ) -> tuple[Timing, Trainer]:
    """Time per step of our Trainer over ``steps`` optimizer steps after ``warmup``; returns the Trainer for its
    caches. ``hooks`` run at the window's ends."""
    cfg = dataclasses.replace(cfg, max_train_steps=warmup + steps + 1)
    clock = StepClock(warmup, steps, bundle.device)
    if hooks is not None:
        clock.at_window_start, clock.at_window_end = hooks.at_window_start, hooks.at_window_end
    trainer = Trainer(cfg, bundle, clock)
    trainer.run()
    return clock.timing, trainer


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

    def run(self, warmup: int, steps: int, hooks: WindowHooks | None = None) -> Timing:
        """Time per step over optimizer steps ``warmup+1 .. warmup+steps`` (fresh LoRA and optimizer each
        call), stamped at the same points as StepClock stamps ours; ``hooks`` run at the window's ends."""
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
        stamps: list[Stamp] = []
        try:
            for step in range(warmup + steps + 1):  # ``step`` optimizer steps are done here
                if step == warmup + steps and hooks:
                    hooks.at_window_end()
                if step in (warmup, warmup + steps):
                    stamps.append(Stamp.now(self.device))
                if step == warmup and hooks:
                    hooks.at_window_start()
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
        return Timing.between(stamps[0], stamps[1], steps)


# ----------------------------------------------------------------------------------------- profile
class WindowProfile(WindowHooks):
    """cProfile over a timed window only, on this process's CPU time (a shared machine's waits left out),
    summed into where a step's time goes: the UNet's forward, the backward pass, the gradient clip, AdamW's
    step and everything else."""

    BUCKETS = {  # label: (file name ends, function name) of the outermost call of each part
        "UNet forward": (("unet_2d_condition.py", "forward"),),
        "backward": (("autograd/__init__.py", "backward"),),
        "clip_grad_norm_": (("clip_grad.py", "clip_grad_norm_"),),
        "AdamW step": (("adam.py", "step"), ("adamw.py", "step")),  # AdamW is Adam's subclass in torch >= 2.5
    }

    def __init__(self) -> None:
        import cProfile

        self.profiler = cProfile.Profile(time.process_time)

    def at_window_start(self) -> None:
        self.profiler.enable()

    def at_window_end(self) -> None:
        self.profiler.disable()

    def buckets(self, steps: int) -> dict[str, float]:
        """CPU ms per step in each bucket (cumulative time of the outermost matching call), and the rest."""
        import pstats

        stats = pstats.Stats(self.profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
        total = sum(entry[2] for entry in stats.values())
        result: dict[str, float] = {}
        for label, places in self.BUCKETS.items():
            result[label] = sum(entry[3] for (file, _, func), entry in stats.items()
                                if any(file.replace("\\", "/").endswith(end) and func == name for end, name in places))
        result["everything else"] = total - sum(result.values())
        return {label: 1000 * seconds / steps for label, seconds in result.items()}

    def functions(self, path_part: str, steps: int) -> list[tuple[str, float, float]]:
        """(file:line(function), own ms per step, cumulative ms per step) of every profiled function whose file
        path contains ``path_part``, most cumulative time first."""
        import pstats

        stats = pstats.Stats(self.profiler).stats
        rows = [(f"{file.split(path_part, 1)[1]}:{line}({func})", 1000 * entry[2] / steps, 1000 * entry[3] / steps)
                for (file, line, func), entry in stats.items() if path_part in file.replace("\\", "/")]
        return sorted(rows, key=lambda row: -row[2])

    def top(self, count: int) -> str:
        """The functions with the most own time (file:line), for what 'everything else' is."""
        import io
        import pstats

        stream = io.StringIO()
        pstats.Stats(self.profiler, stream=stream).sort_stats("tottime").print_stats(count)
        return stream.getvalue()


# ----------------------------------------------------------------------------------------- A/B timing
# Below this, ours/reference is not a result: the same UNet work with the same tensors cannot take 10 % less
# time in a loop that does more around it; the window or the stamps are wrong (what the old should_stop
# clock did: it timed latent caching).
IMPLAUSIBLE_RATIO = 0.9


@dataclass
class Comparison:
    ours: list[Timing]
    reference: list[Timing]

    def ratios(self, clock: str = "wall") -> list[float]:
        """Per-pair ratios ours/reference; each pair ran back to back, so slow drift cancels."""
        return [getattr(o, clock) / getattr(r, clock) for o, r in zip(self.ours, self.reference, strict=True)]

    def ratio(self, clock: str = "wall") -> float:
        """Median of the per-pair ratios."""
        return statistics.median(self.ratios(clock))

    def spread(self, clock: str = "wall") -> str:
        """Median with the min-max and the middle half (quartiles) of the per-pair ratios."""
        values = sorted(self.ratios(clock))
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        return (f"{statistics.median(values):.3f} (min-max {values[0]:.3f}-{values[-1]:.3f}, "
                f"quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, n={len(values)})")

    def check(self, clock: str = "wall") -> None:
        """A median ratio below IMPLAUSIBLE_RATIO is a measurement error: raise, do not report it."""
        if self.ratio(clock) < IMPLAUSIBLE_RATIO:
            raise MeasurementError(
                f"ours/reference on the {clock} clock = {self.ratio(clock):.3f} < {IMPLAUSIBLE_RATIO}: our loop "
                "does the reference's work and more, so this is a broken measurement, not a speed-up")

    @staticmethod
    def describe(values: list[Timing], clock: str = "wall") -> str:
        ms = [getattr(v, clock) * 1000 for v in values]
        return f"{statistics.median(ms):8.1f} ({min(ms):.1f}-{max(ms):.1f})"


def alternate(ours: Callable[[], Timing], reference: Callable[[], Timing], repeats: int) -> Comparison:
    """A/B, B/A, A/B, ...: each repeat runs both, starting with the other one than last time."""
    result = Comparison([], [])
    for repeat in range(repeats):
        if repeat % 2 == 0:
            result.ours.append(ours())
            result.reference.append(reference())
        else:
            result.reference.append(reference())
            result.ours.append(ours())
        o, r = result.ours[-1], result.reference[-1]
        print(f"  repeat {repeat + 1}/{repeats}: ours {1000 * o.wall:.1f} ms/step (cpu {1000 * o.cpu:.1f}), "
              f"reference {1000 * r.wall:.1f} (cpu {1000 * r.cpu:.1f}), ratio {o.wall / r.wall:.3f} "
              f"(cpu {o.cpu / r.cpu:.3f})", flush=True)
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
