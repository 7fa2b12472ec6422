"""Which config keys hold paths, and how relative ones are read: against the YAML file's folder (the current
folder for ``--set``), as lora-scripts users expect of a config that sits next to its data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_train.engine.config.fields import ALIASES

# Keys that hold paths: relative ones are read against the YAML's folder, or the current folder for --set.
PATH_KEYS = ("train_data_dir", "metadata_path", "reg_data_dir", "conditioning_data_dir", "output_dir",
             "network_weights", "resume", "logging_dir", "base_model", "sample_prompts")


def prompts_file(value: Any) -> str | None:
    """The file ``sample_prompts`` names (kohya's form: one .txt), or None when it holds the prompts."""
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and len(items) == 1 and str(items[0]).endswith(".txt"):
        return str(items[0])
    return None


def resolve_paths(data: dict[str, Any], folder: Path) -> None:
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
