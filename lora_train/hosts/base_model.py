"""The family of the CLI's ``base_model`` (built-in name, diffusers folder or checkpoint file), known before loading.

Read from config files and tensor headers only, so a wrong path costs a second, not a model load.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_train.engine.config.settings import ConfigError
from lora_train.engine.model import Family
from lora_train.engine.output import weight_kinds
from lora_train.engine.output.weights import WeightsFileError, read_header
from lora_train.hosts.architectures import BUILTIN


def base_model_family(base_model: str) -> Family:
    """The family of the CLI's ``base_model`` (built-in name, diffusers folder or checkpoint file), from config
    files and tensor headers only; ConfigError naming the file when it is not a model we can train."""
    if base_model in BUILTIN:
        return BUILTIN[base_model].family
    path = Path(base_model).expanduser()
    if path.is_dir():
        return folder_family(path)
    if not path.is_file():
        raise ConfigError("base_model", f"{base_model!r}: no such file or folder; give a .safetensors/.ckpt "
                          f"checkpoint, a diffusers folder, or one of the built-in models: {', '.join(BUILTIN)}")
    try:
        shapes, metadata = read_header(path)
        return weight_kinds.require_checkpoint(path, shapes, metadata)
    except WeightsFileError as exc:
        raise ConfigError("base_model", str(exc)) from None


def folder_family(path: Path) -> Family:
    """SDXL folders have text_encoder_2; SD2's text encoder is 1024 wide; else SD1."""
    config = path / "text_encoder" / "config.json"
    if not (path / "unet" / "config.json").is_file() or not config.is_file():
        raise ConfigError("base_model", f"{path} is a folder but not a diffusers model (no unet/config.json or "
                          "text_encoder/config.json); give a diffusers folder or a checkpoint file")
    if (path / "text_encoder_2").is_dir():
        return "sdxl"
    try:
        width = json.loads(config.read_text(encoding="utf-8"))["hidden_size"]
    except (ValueError, KeyError):
        raise ConfigError("base_model", f"{config} is damaged (no hidden_size)") from None
    return "sd2" if width == 1024 else "sd1"
