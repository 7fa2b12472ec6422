"""Typed training config with the key names lora-scripts and kohya users know; YAML in and out.

Validation happens before any work starts: an unknown key or a bad value raises one ``ConfigError``
that names the key, the value and, for a typo, the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_train.engine import caption_store

Optimizer = Literal["adamw", "adamw8bit", "prodigy", "sgd"]
Scheduler = Literal[
    "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"
]
Precision = Literal["no", "fp16", "bf16"]
SavePrecision = Literal["fp16", "bf16", "float"]


def tensorboard_folder(logging_dir: str | None, output_dir: str) -> Path | None:
    """Where TensorBoard logs go: ``logging_dir``; unset, ``output_dir/logs`` when tensorboard is installed
    (what lora-scripts users expect); ``""`` turns logging off."""
    if logging_dir:
        return Path(logging_dir)
    if logging_dir is None and importlib.util.find_spec("tensorboard") is not None:
        return Path(output_dir) / "logs"
    return None


class ConfigError(ValueError):
    """A bad config value; ``key`` names the field so UIs can point at it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are sane for a first character LoRA on SD1.5."""

    # data
    train_data_dir: str = ""
    metadata_path: str | None = None
    caption_extension: str = ".txt"
    reg_data_dir: str | None = None
    prior_loss_weight: float = 1.0
    trigger_word: str | None = None
    resolution: str = "512"
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    # model
    base_model: str = "tiny"
    v_parameterization: bool | None = None
    clip_skip: int = 1
    # network
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    train_text_encoder: bool = False
    network_weights: str | None = None
    # optimisation
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    epochs: int = 10
    max_train_steps: int | None = None
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    optimizer: Optimizer = "adamw"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: Scheduler = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    mixed_precision: Precision = "no"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    torch_compile: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    seed: int = 42
    device: str = "auto"
    # output
    output_dir: str = "output"
    output_name: str = "lora"
    overwrite: bool = False
    save_precision: SavePrecision = "fp16"
    save_every_n_steps: int = 0
    save_every_n_epochs: int = 0
    resume: str | None = None
    logging_dir: str | None = None
    log_every_n_steps: int = 10
    sample_prompts: list[str] = field(default_factory=list)
    sample_every_n_steps: int = 0
    sample_steps: int = 20
    sample_cfg_scale: float = 7.0
    training_comment: str | None = None

    def __post_init__(self) -> None:
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension  # kohya writes both "txt" and ".txt"
        validate(self)

    @property
    def resolution_hw(self) -> tuple[int, int]:
        """``resolution`` as (height, width); kohya writes "512" or "512,768" (width,height)."""
        parts = [p.strip() for p in str(self.resolution).split(",")]
        width = int(parts[0])
        height = int(parts[1]) if len(parts) > 1 else width
        return height, width

    @property
    def tensorboard_dir(self) -> Path | None:
        """See ``tensorboard_folder``."""
        return tensorboard_folder(self.logging_dir, self.output_dir)

    @property
    def prompts(self) -> list[str]:
        """``sample_prompts`` as a list, or read one per line from a .txt file (kohya's form)."""
        file = prompts_file(self.sample_prompts)
        if file is None:
            return list(self.sample_prompts)
        path = Path(file)
        if not path.is_file():
            raise ConfigError("sample_prompts", f"file {path} not found; give a .txt with one prompt per line")
        try:
            lines = caption_store.read_text(path).splitlines()
        except caption_store.CaptionFileError as exc:
            raise ConfigError("sample_prompts", str(exc)) from None
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# kohya / lora-scripts spellings accepted as the same field.
ALIASES = {
    "pretrained_model_name_or_path": "base_model",
    "network_dim": "lora_rank",
    "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "optimizer_type": "optimizer",
    "lr_warmup": "lr_warmup_steps",
    "save_model_as_precision": "save_precision",
    # lora-scripts' published configs
    "scheduler": "lr_scheduler",
    "alpha": "lora_alpha",
    "save_steps": "save_every_n_steps",
}
_OPTIMIZER_SPELLINGS = {"adamw8bit": "adamw8bit", "adamw_8bit": "adamw8bit", "adamw": "adamw"}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _nearest(key: str) -> str:
    match = difflib.get_close_matches(key, list(_FIELDS) + list(ALIASES), n=1, cutoff=0.5)
    return f"; did you mean '{ALIASES.get(match[0], match[0])}'?" if match else ""


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the field's type, converting the lossless cases (int→float, "1e-4"→float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
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


def validate(cfg: TrainConfig) -> None:
    """Range and cross-field checks that types alone cannot express."""
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
    if cfg.max_train_steps is not None and cfg.max_train_steps <= 0:
        raise ConfigError("max_train_steps", f"{cfg.max_train_steps!r} must be greater than 0")
    if cfg.min_snr_gamma is not None and cfg.min_snr_gamma <= 0:
        raise ConfigError("min_snr_gamma", f"{cfg.min_snr_gamma!r} must be greater than 0 (5 is typical)")
    if cfg.clip_skip not in (1, 2):
        raise ConfigError("clip_skip", f"{cfg.clip_skip!r} must be 1 or 2")
    try:
        height, width = cfg.resolution_hw
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
    if cfg.sample_every_n_steps and not cfg.sample_prompts:
        raise ConfigError("sample_prompts", "sample_every_n_steps is set but there are no sample_prompts")


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a config from plain data, resolving aliases and rejecting unknown keys with a suggestion."""
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = ALIASES.get(raw_key, raw_key)
        if key == "network_train_unet_only":
            key, value = "train_text_encoder", not value
        if key not in _FIELDS:
            raise ConfigError(raw_key, f"unknown key{_nearest(raw_key)}")
        if key == "optimizer" and isinstance(value, str):
            value = _OPTIMIZER_SPELLINGS.get(value.lower(), value.lower())
        hints = typing.get_type_hints(TrainConfig)
        values[key] = _coerce(raw_key, value, hints[key])
    return TrainConfig(**values)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set key=value``; the value is read as YAML so numbers and booleans keep their type."""
    if "=" not in text:
        raise ConfigError(text, "--set needs key=value, e.g. --set learning_rate=5e-5")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


# Keys that hold paths: relative ones are read against the YAML's folder, or the current folder for --set.
PATH_KEYS = ("train_data_dir", "metadata_path", "reg_data_dir", "output_dir", "network_weights", "resume",
             "logging_dir", "base_model", "sample_prompts")


def prompts_file(value: Any) -> str | None:
    """The file ``sample_prompts`` names (kohya's form: one .txt), or None when it holds the prompts."""
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and len(items) == 1 and str(items[0]).endswith(".txt"):
        return str(items[0])
    return None


def _resolve_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative paths in ``data`` absolute against ``folder`` (a base_model only when it exists there:
    otherwise it may be a built-in name)."""
    for raw_key, value in data.items():
        key = ALIASES.get(raw_key, raw_key)
        if key not in PATH_KEYS:
            continue
        if key == "sample_prompts":
            value = prompts_file(value)
        if not isinstance(value, str) or not value:
            continue
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            candidate = (folder / candidate).resolve()
        if key != "base_model" or candidate.exists():
            data[raw_key] = str(candidate)


def load(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config and apply ``--set`` overrides.

    Relative paths in the file are read against the file's folder; relative paths given with ``--set`` against
    the current folder, where the user typed them (``--set resume=output/x-state`` after a run).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file {str(path)!r} not found")
    try:
        data = yaml.safe_load(caption_store.read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
    except caption_store.CaptionFileError as exc:
        raise ConfigError("--config", str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of key: value lines")
    _resolve_paths(data, path.parent)
    given = dict(parse_override(item) for item in overrides or [])
    _resolve_paths(given, Path.cwd())
    data.update(given)
    return from_dict(data)


def dump(cfg: TrainConfig) -> str:
    """YAML text that ``load`` reads back to an equal config (the UI's Save and the CLI share it)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
