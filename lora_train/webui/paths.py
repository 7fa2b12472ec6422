"""Which files a training request may touch, and safe output names.

The WebUI may listen on a network, so every dataset, config and output path that arrives from the tab or the
REST API is resolved (symlinks included) and must lie inside an allowed root. Finished LoRAs land in the Lora
folder; everything else a run writes (resumable state, step checkpoints, samples) goes to the run folder, because
the WebUI lists every .safetensors/.pt/.ckpt under models/Lora as a card. A refusal is a ``PathNotAllowed`` (a
``ConfigError``) naming the config key and the setting to change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lora_train.engine.config.settings import ConfigError, TrainConfig

# Windows device names are reserved with any extension ("nul.safetensors" opens the null device there).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_UNSAFE_CHARS = re.compile(r'[\\/:*?"<>|\x00-\x1f]')
MAX_NAME_LENGTH = 100
SETTING_NAME = "Settings > LoRA Train > Extra allowed dataset folders"

# Config keys that name files or folders the trainer reads, and the ones it writes.
INPUT_KEYS = ("train_data_dir", "reg_data_dir", "conditioning_data_dir", "metadata_path", "network_weights", "resume")
OUTPUT_KEYS = ("output_dir", "logging_dir")


class PathNotAllowed(ConfigError):
    """A path outside the allowed roots; ``key`` names the config field."""


def sanitize_name(name: str, fallback: str = "") -> str:
    """A plain file stem: no path separators, no ``..``, no reserved device names, at most 100 characters.

    Unsafe characters become ``_``; leading/trailing dots and spaces go (Windows drops them silently).
    Raises ConfigError("output_name") when nothing usable is left and there is no fallback.
    """
    cleaned = _UNSAFE_CHARS.sub("_", str(name or "")).strip(" .")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:MAX_NAME_LENGTH].strip(" .")
    if cleaned.split(".")[0].upper() in _RESERVED:
        cleaned = f"_{cleaned}"
    if not cleaned or cleaned.strip("_") == "":
        if fallback:
            return sanitize_name(fallback)
        raise ConfigError("output_name", f"{name!r} has no usable characters; use letters, digits, - or _")
    return cleaned


def resolve(path: str | Path) -> Path:
    """Absolute path with symlinks and ``..`` resolved, whether or not it exists yet."""
    return Path(path).expanduser().resolve(strict=False)


def is_inside(path: str | Path, root: str | Path) -> bool:
    resolved, base = resolve(path), resolve(root)
    return resolved == base or base in resolved.parents


@dataclass
class PathPolicy:
    """Allowed roots for inputs, the root for finished LoRAs and the root for run files.

    ``input_roots`` None means unrestricted (the standalone UI on localhost); the WebUI passes its data folder,
    its Lora folder, the run folder and the folders listed in Settings. ``output_root`` is where finished LoRAs go
    (the Lora folder); ``work_root`` where state, checkpoints and samples go (None: the output root, as the CLI).
    """

    output_root: Path
    input_roots: list[Path] | None = None
    setting: str = SETTING_NAME
    work_root: Path | None = None

    @property
    def run_root(self) -> Path:
        """Where a run's state, step checkpoints and samples go."""
        return self.work_root or self.output_root

    @classmethod
    def for_webui(cls, data_dir: str | Path, lora_dir: str | Path, run_dir: str | Path,
                  extra: Iterable[str | Path] = ()) -> PathPolicy:
        extra_roots = [resolve(p) for p in extra if str(p).strip()]
        roots = [resolve(data_dir), resolve(lora_dir), resolve(run_dir), *extra_roots]
        return cls(output_root=resolve(lora_dir), input_roots=roots, work_root=resolve(run_dir))

    def check_input(self, path: str | Path, key: str) -> Path:
        """The resolved path if it lies inside an allowed root, else PathNotAllowed naming ``key``."""
        resolved = resolve(path)
        if self.input_roots is None or any(is_inside(resolved, root) for root in self.input_roots):
            return resolved
        roots = ", ".join(str(r) for r in self.input_roots)
        raise PathNotAllowed(key, f"{str(path)!r} is outside the allowed folders ({roots}); add its folder in "
                                  f"{self.setting}")

    def check_output(self, path: str | Path, key: str) -> Path:
        resolved = resolve(path)
        if is_inside(resolved, self.output_root) or is_inside(resolved, self.run_root):
            return resolved
        raise PathNotAllowed(key, f"{str(path)!r} is outside the output folder {self.output_root} and the run "
                                  f"folder {self.run_root}; outputs always go there (Settings > LoRA Train)")

    def check_exists(self, path: str | Path, key: str) -> Path:
        """``check_input``, and the path must exist: a folder for the ``*_dir`` keys and ``resume``, else a file."""
        resolved = self.check_input(path, key)
        wants_folder = key.endswith("_dir") or key == "resume"
        if wants_folder and not resolved.is_dir():
            what = "is a file, not a folder" if resolved.exists() else "does not exist"
            raise ConfigError(key, f"{str(path)!r} {what}; pick an existing folder")
        if not wants_folder and not resolved.is_file():
            what = "is a folder, not a file" if resolved.exists() else "does not exist"
            raise ConfigError(key, f"{str(path)!r} {what}; pick an existing file")
        return resolved

    def check_config(self, cfg: TrainConfig) -> None:
        """Every path field of ``cfg``: inputs inside the allowed roots, outputs inside the output root."""
        for key in INPUT_KEYS:
            value = getattr(cfg, key)
            if value:
                self.check_input(value, key)
        for key in OUTPUT_KEYS:
            value = getattr(cfg, key)
            if value:
                self.check_output(value, key)
