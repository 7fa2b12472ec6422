"""Value checks for ``TrainConfig``: type coercion with the field named, and the range and cross-field rules.

Kept apart from the dataclass so the field list (with its help text) reads on its own; every failure is one
``ConfigError`` naming the key, so the CLI, the tab and the API can all point at it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad config value; ``key`` names the field so UIs can point at it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the field's type, converting the lossless cases (int→float, "1e-4"→float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if origin is Literal:
        text = str(value).lower() if isinstance(value, str) else value
        if value is False and "no" in args:  # YAML reads a bare `no` as false
            text = "no"
        if text not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(key, f"{value!r} is not one of: {allowed}")
        return text
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(key, f"{value!r} is not true or false")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(key, f"{value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"{value!r} is not a number") from None
        if annotation is int:
            if not number.is_integer():
                raise ConfigError(key, f"{value!r} is not a whole number")
            return int(number)
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"{value!r} is not text")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            return [value] if value else []
        if not isinstance(value, list):
            raise ConfigError(key, f"{value!r} is not a list")
        return [str(v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"{value!r} is not a mapping")
        return value
    return value


_POSITIVE = ("lora_rank", "batch_size", "gradient_accumulation_steps", "epochs", "bucket_reso_steps",
             "sample_steps", "lr_scheduler_num_cycles",
             "log_every_n_steps")
_NON_NEGATIVE = ("lora_dropout", "noise_offset", "lr_warmup_steps", "keep_tokens", "save_every_n_steps",
                 "save_every_n_epochs", "sample_every_n_steps", "max_grad_norm", "prior_loss_weight")


def parse_resolution(resolution: str) -> tuple[int, int]:
    """kohya's ``resolution`` ("512" or "width,height") as (height, width); ValueError when it is neither."""
    parts = [p.strip() for p in str(resolution).split(",")]
    width = int(parts[0])
    height = int(parts[1]) if len(parts) > 1 else width
    return height, width


def validate(values: Mapping[str, Any]) -> None:
    """Range and cross-field checks that types alone cannot express, over a config's values by key (the
    dataclass's ``vars``), so this module needs nothing of the dataclass that calls it."""
    cfg = SimpleNamespace(**values)
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, f"{getattr(cfg, key)!r} must be greater than 0")
    for key in _NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(key, f"{getattr(cfg, key)!r} must not be negative")
    if cfg.lora_alpha <= 0:
        raise ConfigError("lora_alpha", f"{cfg.lora_alpha!r} must be greater than 0 (kohya: often rank or rank/2)")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError("lora_dropout", f"{cfg.lora_dropout!r} must be in [0, 1)")
    if not 0 <= cfg.caption_dropout_rate <= 1:
        raise ConfigError("caption_dropout_rate", f"{cfg.caption_dropout_rate!r} must be in [0, 1]")
    for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(key, f"{value!r} must be greater than 0 (e.g. 1e-4)")
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(key, f"{value!r} must be greater than 0 (16 is the LoRA+ paper's value)")
    if cfg.max_train_steps is not None and cfg.max_train_steps <= 0:
        raise ConfigError("max_train_steps", f"{cfg.max_train_steps!r} must be greater than 0")
    if cfg.min_snr_gamma is not None and cfg.min_snr_gamma <= 0:
        raise ConfigError("min_snr_gamma", f"{cfg.min_snr_gamma!r} must be greater than 0 (5 is typical)")
    _check_noise_and_loss(cfg)
    if cfg.v_pred_like_loss is not None and cfg.v_pred_like_loss < 0:
        raise ConfigError("v_pred_like_loss", f"{cfg.v_pred_like_loss!r} must not be negative (0.1 is usual)")
    if cfg.max_token_length not in (75, 150, 225):
        raise ConfigError("max_token_length", f"{cfg.max_token_length!r} must be 75, 150 or 225 (tokens per caption)")
    if cfg.clip_skip is not None and not 1 <= cfg.clip_skip <= 12:
        raise ConfigError("clip_skip", f"{cfg.clip_skip!r} must be 1-12 (as the WebUI's Clip skip), or unset")
    try:
        height, width = parse_resolution(cfg.resolution)
    except ValueError:
        raise ConfigError("resolution", f"{cfg.resolution!r} is not '512' or 'width,height'") from None
    for side in (height, width):
        if side < 64 or side % 8:
            raise ConfigError("resolution", f"{cfg.resolution!r}: sides must be >= 64 and multiples of 8")
    if cfg.min_bucket_reso > cfg.max_bucket_reso:
        raise ConfigError("min_bucket_reso", "must not exceed max_bucket_reso")
    if not cfg.output_name or any(c in cfg.output_name for c in '/\\:*?"<>|') or cfg.output_name in (".", ".."):
        raise ConfigError("output_name", f"{cfg.output_name!r} must be a plain file name without path separators")
    try:
        Path("image.png").with_suffix(cfg.caption_extension)
    except ValueError:
        raise ConfigError("caption_extension", f"{cfg.caption_extension!r} is not a file extension like .txt") from None
    if not 0 <= cfg.validation_split < 1:
        raise ConfigError("validation_split", f"{cfg.validation_split!r} must be in [0, 1), e.g. 0.1")
    for key in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(key, f"{value!r} must be greater than 0 (leave it unset for the default)")
    if cfg.sample_every_n_steps and not cfg.sample_prompts:
        raise ConfigError("sample_prompts", "sample_every_n_steps is set but there are no sample_prompts")


def _check_noise_and_loss(cfg: SimpleNamespace) -> None:
    """kohya's noise and loss options: ranges, and the keys that only mean something together."""
    for key in ("multires_noise_iterations", "ip_noise_gamma"):  # kohya-GUI configs write 0 for off
        value = getattr(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(key, f"{value!r} must not be negative (0 or unset is off)")
    if cfg.adaptive_noise_scale is not None and not cfg.noise_offset:
        raise ConfigError("adaptive_noise_scale", "needs noise_offset (it is added to it); set noise_offset: 0.05")
    if not 0 <= cfg.multires_noise_discount <= 1:
        raise ConfigError("multires_noise_discount",
                          f"{cfg.multires_noise_discount!r} must be in [0, 1] (0.3 is usual)")
    if cfg.min_timestep is not None and not 0 <= cfg.min_timestep <= 999:
        raise ConfigError("min_timestep", f"{cfg.min_timestep!r} must be in 0-999")
    if cfg.max_timestep is not None and not 1 <= cfg.max_timestep <= 1000:
        raise ConfigError("max_timestep", f"{cfg.max_timestep!r} must be in 1-1000")
    if cfg.min_timestep is not None and cfg.max_timestep is not None and cfg.min_timestep > cfg.max_timestep:
        raise ConfigError("min_timestep", f"{cfg.min_timestep!r} is above max_timestep {cfg.max_timestep!r}")
    for key in ("huber_c", "huber_scale"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, f"{getattr(cfg, key)!r} must be greater than 0 (kohya's default: "
                                   f"{'0.1' if key == 'huber_c' else '1.0'})")
    if cfg.masked_loss and not (cfg.alpha_mask or cfg.conditioning_data_dir):
        raise ConfigError("masked_loss", "needs a mask: alpha_mask: true (the images' alpha channel) or "
                                         "conditioning_data_dir (a folder of mask images named like the images)")
    if cfg.conditioning_data_dir and not cfg.masked_loss:
        raise ConfigError("conditioning_data_dir", "holds loss masks, read only with masked_loss: true")
    if cfg.conditioning_data_dir and cfg.alpha_mask:
        raise ConfigError("alpha_mask", "choose one mask: the images' alpha channel or conditioning_data_dir's "
                                        "mask images, not both")
