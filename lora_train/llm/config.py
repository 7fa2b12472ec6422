"""The text-generation task's config: lora-scripts and HF-Trainer key spellings in one typed dataclass.

Field names match the SD engine's ``TrainConfig`` where the meaning is the same, so ``lora_train.engine.train.optim``'s
optimizer, schedule and scaler factories read this config unchanged. Type checks are ``config._coerce``'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_train.engine.config.checks import coerce as _coerce
from lora_train.engine.config.settings import (
    ConfigError,
    Optimizer,
    Precision,
    Scheduler,
    tensorboard_folder,
)
from lora_train.engine.config.yaml_io import parse_override, read_mapping

TASK_NAMES = ("text-generation", "llm", "causal-lm", "causal_lm")
TINY_MODEL = "tiny-llm"


@dataclass
class LlmConfig:
    """A LoRA run on a causal language model. Defaults suit a small chat/persona adapter."""

    task_type: str = "text-generation"
    # data
    train_data_dir: str = ""
    max_seq_length: int = 512
    packing: bool = False
    # model
    base_model: str = TINY_MODEL
    target_modules: list[str] = field(default_factory=list)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    # network
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    network_weights: str | None = None
    # optimisation
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    epochs: int = 3
    max_train_steps: int | None = None
    learning_rate: float = 2e-4
    optimizer: Optimizer = "adamw"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: Scheduler = "constant"
    lr_warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    mixed_precision: Precision = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    device: str = "auto"
    # output
    output_dir: str = "output"
    output_name: str = "llm-lora"
    overwrite: bool = False
    save_every_n_steps: int = 0
    log_every_n_steps: int = 10
    logging_dir: str | None = None  # TensorBoard: unset, output_dir/logs when tensorboard is installed; "" off
    resume: str | None = None
    sample_prompts: list[str] = field(default_factory=list)  # answered before and after training, in the log

    def __post_init__(self) -> None:
        validate(self)

    @property
    def tensorboard_dir(self) -> Path | None:
        """See ``config.tensorboard_folder``."""
        return tensorboard_folder(self.logging_dir, self.output_dir)


# lora-scripts, kohya and HF-Trainer spellings accepted as the same field.
ALIASES = {
    "task": "task_type",
    "train_file": "train_data_dir",
    "data_path": "train_data_dir",
    "dataset_path": "train_data_dir",
    "max_length": "max_seq_length",
    "cutoff_len": "max_seq_length",
    "pretrained_model_name_or_path": "base_model",
    "model_name_or_path": "base_model",
    "lora_r": "lora_rank",
    "network_dim": "lora_rank",
    "alpha": "lora_alpha",
    "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "max_train_epochs": "epochs",
    "max_steps": "max_train_steps",
    "optimizer_type": "optimizer",
    "optim": "optimizer",
    "lr_scheduler_type": "lr_scheduler",
    "scheduler": "lr_scheduler",
    "warmup_steps": "lr_warmup_steps",
    "lr_warmup": "lr_warmup_steps",
    "save_steps": "save_every_n_steps",
    "logging_steps": "log_every_n_steps",
    "resume_from_checkpoint": "resume",
}
# HF-Trainer's `optim` names for the optimizers we have
_OPTIMIZER_SPELLINGS = {"adamw_torch": "adamw", "adamw_hf": "adamw", "adamw_8bit": "adamw8bit",
                        "adamw_bnb_8bit": "adamw8bit", "paged_adamw_8bit": "adamw8bit"}
_PRECISION_FLAGS = ("fp16", "bf16")  # HF-Trainer booleans for mixed_precision
_PATH_KEYS = ("train_data_dir", "output_dir", "network_weights", "resume", "base_model", "logging_dir")
_FIELDS = {f.name for f in dataclasses.fields(LlmConfig)}


def is_llm_config(data: dict[str, Any]) -> bool:
    """True when a config's ``task_type`` / ``task`` names text generation (the SD path otherwise)."""
    task = data.get("task_type", data.get("task"))
    return isinstance(task, str) and task.strip().lower() in TASK_NAMES


def validate(cfg: LlmConfig) -> None:
    """Range and cross-field checks that types alone cannot express."""
    if cfg.task_type.lower() not in TASK_NAMES:
        raise ConfigError("task_type", f"{cfg.task_type!r} is not a text-generation task ({', '.join(TASK_NAMES)})")
    for key in ("lora_rank", "batch_size", "gradient_accumulation_steps", "epochs", "max_seq_length",
                "log_every_n_steps", "lr_scheduler_num_cycles", "learning_rate", "lora_alpha"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, f"{getattr(cfg, key)!r} must be greater than 0")
    for key in ("lr_warmup_steps", "save_every_n_steps", "max_grad_norm"):
        if getattr(cfg, key) < 0:
            raise ConfigError(key, f"{getattr(cfg, key)!r} must not be negative")
    if cfg.max_train_steps is not None and cfg.max_train_steps <= 0:
        raise ConfigError("max_train_steps", f"{cfg.max_train_steps!r} must be greater than 0")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError("lora_dropout", f"{cfg.lora_dropout!r} must be in [0, 1)")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError("warmup_ratio", f"{cfg.warmup_ratio!r} must be in [0, 1), e.g. 0.03")
    if cfg.warmup_ratio and cfg.lr_warmup_steps:
        raise ConfigError("warmup_ratio", "set warmup_ratio or lr_warmup_steps (warmup_steps), not both")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ConfigError("load_in_4bit", "choose load_in_4bit or load_in_8bit, not both")
    if cfg.logging_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging_dir", "TensorBoard logging needs the tensorboard package (pip install tensorboard)")
    if not cfg.output_name or any(c in cfg.output_name for c in '/\\:*?"<>|') or cfg.output_name in (".", ".."):
        raise ConfigError("output_name", f"{cfg.output_name!r} must be a plain name without path separators")


def _nearest(key: str) -> str:
    match = difflib.get_close_matches(key, sorted(_FIELDS | set(ALIASES) | set(_PRECISION_FLAGS)), n=1, cutoff=0.5)
    return f"; did you mean '{ALIASES.get(match[0], match[0])}'?" if match else ""


def _precision(data: dict[str, Any]) -> str | None:
    """``fp16: true`` / ``bf16: true`` (HF-Trainer) as a ``mixed_precision`` value; None when neither is set."""
    flags = [name for name in _PRECISION_FLAGS if _coerce(name, data.get(name, False), bool)]
    if len(flags) > 1:
        raise ConfigError("fp16", "fp16 and bf16 are both true; choose one")
    return flags[0] if flags else None


def from_dict(data: dict[str, Any]) -> LlmConfig:
    """Build a config from plain data, resolving aliases and rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(LlmConfig)
    values: dict[str, Any] = {}
    precision = _precision(data)
    for raw_key, value in data.items():
        if raw_key in _PRECISION_FLAGS:
            continue
        key = ALIASES.get(raw_key, raw_key)
        if key not in _FIELDS:
            raise ConfigError(raw_key, f"unknown key{_nearest(raw_key)}")
        if key in values:
            raise ConfigError(raw_key, f"'{key}' is already set by another spelling; keep one")
        if key == "optimizer" and isinstance(value, str):
            value = _OPTIMIZER_SPELLINGS.get(value.lower(), value.lower())
        values[key] = _coerce(raw_key, value, hints[key])
    if precision:
        if values.get("mixed_precision", "no") not in ("no", precision):
            raise ConfigError(precision, f"contradicts mixed_precision: {values['mixed_precision']}")
        values["mixed_precision"] = precision
    return LlmConfig(**values)


def read_yaml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML config as a mapping with ``--set key=value`` overrides applied (no validation yet)."""
    data = read_mapping(path)
    for item in overrides or []:
        key, value = parse_override(item)
        data[key] = value
    return data


def load(path: str | Path, overrides: list[str] | None = None) -> LlmConfig:
    """Read a YAML config; relative paths are relative to the file's folder (as in the SD path)."""
    data = read_yaml(path, overrides)
    folder = Path(path).parent
    for raw_key, value in data.items():
        key = ALIASES.get(raw_key, raw_key)
        if key in _PATH_KEYS and isinstance(value, str) and value and value != TINY_MODEL:
            candidate = (folder / value).resolve()
            if not Path(value).is_absolute() and (key != "base_model" or candidate.exists()):
                data[raw_key] = str(candidate)
    return from_dict(data)
