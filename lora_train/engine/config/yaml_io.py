"""Config in and out: plain data or a YAML file (+ ``--set`` overrides) to a checked ``TrainConfig``, and back.

Aliases (kohya / lora-scripts spellings) resolve here, and an unknown key names its nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from lora_train.engine.config.checks import ConfigError
from lora_train.engine.config.checks import coerce as _coerce
from lora_train.engine.config.fields import ALIASES, INVERTED_ALIASES
from lora_train.engine.config.paths import resolve_paths
from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import caption_store

_OPTIMIZER_SPELLINGS = {"adamw8bit": "adamw8bit", "adamw_8bit": "adamw8bit", "adamw": "adamw"}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _nearest(key: str) -> str:
    match = difflib.get_close_matches(key, list(_FIELDS) + list(ALIASES), n=1, cutoff=0.5)
    return f"; did you mean '{ALIASES.get(match[0], match[0])}'?" if match else ""


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a config from plain data, resolving aliases and rejecting unknown keys with a suggestion."""
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = ALIASES.get(raw_key, raw_key)
        if key in INVERTED_ALIASES:
            key, value = INVERTED_ALIASES[key], not value
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


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A config file's ``key: value`` mapping (UTF-8, a BOM allowed), or ConfigError("--config") saying what is
    wrong with the file: missing, not YAML, not UTF-8, or not a mapping. Shared by the SD and LLM configs."""
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
    return data


def load(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config and apply ``--set`` overrides.

    Relative paths in the file are read against the file's folder; relative paths given with ``--set`` against
    the current folder, where the user typed them (``--set resume=output/x-state`` after a run).
    """
    path = Path(path)
    data = read_mapping(path)
    resolve_paths(data, path.parent)
    given = dict(parse_override(item) for item in overrides or [])
    resolve_paths(given, Path.cwd())
    data.update(given)
    return from_dict(data)


def dump(cfg: TrainConfig) -> str:
    """YAML text that ``load`` reads back to an equal config (the UI's Save and the CLI share it)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
