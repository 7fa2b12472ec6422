"""The LoRA's card (``<name>.json`` beside it, what the WebUI's Lora card and metadata editor read) after judging:
the preferred weight the user picked, and a saved step kept as the final file. Nothing is ever deleted.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lora_train.engine.files import atomic_write, atomic_write_text, free_path

PREFERRED_WEIGHT = "preferred weight"  # the key the WebUI's card and its metadata editor use


def read_card(lora: Path) -> dict:
    path = lora.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON card ({exc}); fix or move it, then choose again") from None
    return card if isinstance(card, dict) else {}


def set_preferred_weight(lora: Path, weight: float) -> Path:
    """Write ``weight`` as the card's preferred weight, keeping every other key of the card."""
    card = read_card(lora)
    card[PREFERRED_WEIGHT] = round(float(weight), 3)
    return atomic_write_text(lora.with_suffix(".json"), json.dumps(card, indent=4, ensure_ascii=False))


def keep_as_final(step_file: Path, final: Path, backup_dir: Path) -> Path | None:
    """Copy ``step_file`` over ``final`` (the file ``<lora:name>`` loads); the replaced final is copied first to
    ``backup_dir`` (outside the Lora folder, where it would show as a card) and its path returned."""
    if step_file.resolve() == final.resolve():
        return None
    backup = None
    if final.is_file():
        backup_dir.mkdir(parents=True, exist_ok=True)
        backup = free_path(backup_dir / f"{final.stem}-replaced-{time.strftime('%Y%m%d-%H%M%S')}.safetensors")
        atomic_write(backup, lambda tmp: shutil.copyfile(final, tmp))
    atomic_write(final, lambda tmp: shutil.copyfile(step_file, tmp))
    return backup
