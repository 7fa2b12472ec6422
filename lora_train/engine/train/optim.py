"""Optimizer, learning-rate schedule and gradient scaler for a run, built from the config.

The schedules are transformers' (``transformers.optimization``): transformers is in every venv we run in, the
WebUI's included, while diffusers is not in the WebUI's venv and its versions that import next to the WebUI's
huggingface_hub differ by host. The formulas are the ones diffusers and kohya use (cosine with half a cycle,
hard restarts, polynomial decay to 1e-7).
"""

from __future__ import annotations

import torch

from lora_train.engine.config.settings import ConfigError, TrainConfig
from lora_train.engine.network.lora import LoraNetwork


def param_groups(cfg: TrainConfig, network: LoraNetwork) -> list[dict]:
    """The UNet's group, then the text encoder's when it trains, each at its learning rate; with LoRA+ the up
    factors of a part move to a group of their own, appended after those, at lr x ratio (kohya's
    ``loraplus_lr_ratio`` and its per-part ``loraplus_unet_lr_ratio`` / ``loraplus_text_encoder_lr_ratio``)."""
    parts = [("lora_unet", cfg.unet_lr or cfg.learning_rate, cfg.loraplus_unet_lr_ratio or cfg.loraplus_lr_ratio)]
    if cfg.train_text_encoder:
        parts.append(("lora_te", cfg.text_encoder_lr or cfg.learning_rate,
                      cfg.loraplus_text_encoder_lr_ratio or cfg.loraplus_lr_ratio))
    groups = [{"params": network.parameters(prefix, up=False if ratio else None), "lr": lr}
              for prefix, lr, ratio in parts]
    groups += [{"params": network.parameters(prefix, up=True), "lr": lr * ratio}
               for prefix, lr, ratio in parts if ratio and network.parameters(prefix, up=True)]
    return groups


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names over the parameter groups (lr per group)."""
    args = dict(cfg.optimizer_args)
    cuda = groups[0]["params"][0].is_cuda
    if cfg.optimizer == "adamw":
        args.setdefault("weight_decay", 1e-2)
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=cuda or None, foreach=None if cuda else True,
                                 **args)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, **args)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError("optimizer", "adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                              "or set optimizer: adamw") from None
        args.setdefault("weight_decay", 1e-2)
        return bitsandbytes.optim.AdamW8bit(groups, lr=cfg.learning_rate, **args)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ConfigError("optimizer", "prodigy needs prodigyopt (pip install prodigyopt); "
                          "or set optimizer: adamw") from None
    return Prodigy(groups, lr=cfg.learning_rate, **args)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``cfg.lr_scheduler`` schedule with ``cfg.lr_warmup_steps`` warmup over ``total_steps``."""
    from transformers import optimization as schedules

    warmup = cfg.lr_warmup_steps
    name = cfg.lr_scheduler
    if name == "constant":
        return schedules.get_constant_schedule(optimizer)
    if name == "constant_with_warmup":
        return schedules.get_constant_schedule_with_warmup(optimizer, warmup)
    if name == "linear":
        return schedules.get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if name == "cosine":
        return schedules.get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if name == "cosine_with_restarts":
        return schedules.get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, warmup, total_steps, num_cycles=cfg.lr_scheduler_num_cycles)
    if name == "polynomial":
        return schedules.get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup, total_steps, power=cfg.lr_scheduler_power)
    raise ConfigError("lr_scheduler", f"unknown schedule {name!r}")


def make_grad_scaler(device: torch.device, enabled: bool):
    """torch >= 2.3 has torch.amp.GradScaler; the WebUI's torch 2.1 only torch.cuda.amp's."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler,
                   params: list[torch.nn.Parameter], max_grad_norm: float) -> None:
    """One optimizer step after the accumulated backward passes: unscale, clip (0: off), step, schedule, clear."""
    if max_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
