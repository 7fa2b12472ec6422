"""Starting points for the three usual kinds of LoRA, per model family.

Values follow common community practice for kohya-style LoRAs: characters need a mid rank and some text-encoder
help on SD1/SD2 (SDXL characters usually train the UNet only, as kohya users do);
styles want a higher rank and more steps; SDXL trains at 1024 with bf16, gradient checkpointing and cached
latents so it fits a 12-16 GB card. Everything here is plain data the user can override in Advanced.

The LoRA's update is scaled by lora_alpha / lora_rank. The presets use alpha = rank/2 (scale 0.5), or
alpha = rank (scale 1) for SDXL characters, the usual kohya practice for runs of 1500-3000 steps; the bare
config defaults (rank 8, alpha 16: scale 2) suit short CLI runs at learning_rate 1e-4 and are left as they are
so existing configs train as before.
"""

from __future__ import annotations

from typing import Any

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.model import Family

PRESET_NAMES = ("Character", "Style", "Concept")
DEFAULT_PRESET = "Character"
PRESET_HELP = ("Sets rank, alpha, learning rate, steps and resolution for the loaded model family. Presets scale "
               "the LoRA by alpha/rank = 0.5-1, gentler than the plain defaults' 2, for their longer runs.")

_COMMON: dict[str, Any] = {
    "optimizer": "adamw",
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 50,
    "min_snr_gamma": 5.0,
    "cache_latents": True,
    "enable_bucket": True,
}

_FAMILY: dict[str, dict[str, Any]] = {
    "sd1": {"resolution": "512", "min_bucket_reso": 256, "max_bucket_reso": 1024, "mixed_precision": "fp16"},
    "sd2": {"resolution": "768", "min_bucket_reso": 384, "max_bucket_reso": 1536, "mixed_precision": "fp16"},
    "sdxl": {"resolution": "1024", "min_bucket_reso": 512, "max_bucket_reso": 2048, "mixed_precision": "bf16",
             "gradient_checkpointing": True},
}

# (kind, family group) -> values; SD2 uses the SD1 numbers at its own resolution.
_KIND: dict[tuple[str, str], dict[str, Any]] = {
    ("Character", "sd1"): {"lora_rank": 16, "lora_alpha": 8.0, "learning_rate": 1e-4, "max_train_steps": 1500,
                           "train_text_encoder": True, "text_encoder_lr": 5e-5, "batch_size": 2},
    ("Character", "sdxl"): {"lora_rank": 16, "lora_alpha": 16.0, "learning_rate": 1e-4, "max_train_steps": 1500,
                            "train_text_encoder": False, "batch_size": 1},
    ("Style", "sd1"): {"lora_rank": 32, "lora_alpha": 16.0, "learning_rate": 1e-4, "max_train_steps": 3000,
                       "train_text_encoder": False, "batch_size": 2, "shuffle_caption": True, "keep_tokens": 1},
    ("Style", "sdxl"): {"lora_rank": 32, "lora_alpha": 16.0, "learning_rate": 8e-5, "max_train_steps": 3000,
                        "train_text_encoder": False, "batch_size": 1, "shuffle_caption": True, "keep_tokens": 1},
    ("Concept", "sd1"): {"lora_rank": 16, "lora_alpha": 8.0, "learning_rate": 1e-4, "max_train_steps": 2000,
                         "train_text_encoder": False, "batch_size": 2, "noise_offset": 0.05},
    ("Concept", "sdxl"): {"lora_rank": 16, "lora_alpha": 8.0, "learning_rate": 1e-4, "max_train_steps": 2000,
                          "train_text_encoder": False, "batch_size": 1, "noise_offset": 0.0357},
}


def preset_keys() -> list[str]:
    """Every key any preset sets; each preset gives all of them (config defaults where it has no opinion)."""
    keys = dict.fromkeys([*_COMMON, *(k for v in _FAMILY.values() for k in v), *(k for v in _KIND.values() for k in v)])
    return list(keys)


def preset_values(name: str, family: Family | str | None, device: str = "cuda") -> dict[str, Any]:
    """Config values for preset ``name`` on ``family`` (SD1 when the family is unknown), for every preset key,
    so switching presets resets what the previous one set. Raises ValueError naming an unknown preset.

    Mixed precision only where ``device`` (a torch device type) runs it fast: on a CPU fp16 autocast is slow or
    unsupported, so CPU presets train in full precision.
    """
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    family = family if family in _FAMILY else "sd1"
    group = "sdxl" if family == "sdxl" else "sd1"
    defaults = TrainConfig().to_dict()
    values = {key: defaults[key] for key in preset_keys()}
    values.update({**_COMMON, **_FAMILY[family], **_KIND[(name, group)]})
    if device != "cuda":
        values["mixed_precision"] = "no"
    return values


def all_presets(family: Family | str | None, device: str = "cuda") -> dict[str, dict[str, Any]]:
    """Every preset for ``family`` on ``device`` (the REST API's presets listing)."""
    return {name: preset_values(name, family, device) for name in PRESET_NAMES}
