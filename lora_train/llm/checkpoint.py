"""Output folders written whole: an adapter, a merged model, or a resumable step checkpoint.

Each is filled in a hidden temp folder beside its target, synced, then renamed into place, so a crash or a
stop leaves either the previous folder or the complete new one. A checkpoint is also a peft adapter folder
(``PeftModel.from_pretrained`` reads it as is) plus optimizer, schedule, scaler and step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_train.engine.config.settings import ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATE = "state.json"


def write_folder(target: Path, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp)`` on a temp folder, sync its files, then rename it to ``target`` (replacing it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = tmp.with_suffix(".old")
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        if target.exists():  # the caller chose this name to be replaced (overwrite, or its own stopped run)
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    return target


def _adapter_files(model, folder: Path) -> None:
    # embeddings are never trained here: skip peft's look-up of the base's config for a resized vocabulary
    model.save_pretrained(str(folder), save_embedding_layers=False)


def save_adapter(target: Path, model) -> Path:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
    return write_folder(target, lambda tmp: _adapter_files(model, tmp))


def save(target: Path, model, objects: dict[str, object], info: dict) -> Path:
    """A step checkpoint: the adapter, ``objects``' state dicts and ``info`` (step, loss history, run name)."""

    def fill(tmp: Path) -> None:
        _adapter_files(model, tmp)
        for name, obj in objects.items():
            torch.save(obj.state_dict(), tmp / f"{name}.pt")
        (tmp / STATE).write_text(json.dumps(info), encoding="utf-8")

    return write_folder(target, fill)


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / STATE
    if not path.is_file():
        raise ConfigError("resume", f"{folder} has no {STATE}; point it at a '<name>-stepNNNNNNNN' checkpoint folder")
    return json.loads(path.read_text(encoding="utf-8"))


def restore(folder: str | Path, model, objects: dict[str, object], device: torch.device) -> None:
    """Load a checkpoint's adapter weights into ``model`` and its state into ``objects``."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    try:
        set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS), device=str(device)))
    except RuntimeError:  # size mismatch: another rank or other layers
        raise ConfigError("resume", f"{folder} was trained with other LoRA settings (rank, target_modules); "
                          "resume with the config that started it") from None
    for name, obj in objects.items():
        obj.load_state_dict(torch.load(folder / f"{name}.pt", map_location=device, weights_only=True))
