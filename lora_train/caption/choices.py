"""The captioners a host offers, what each needs, which one is the default, and loading one by name."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_train.caption import wd14
from lora_train.caption.coca_weights import DEFAULT_MODEL, WEIGHT_FILE_NAMES, find_weights
from lora_train.caption.errors import WeightsMissingError
from lora_train.caption.run import ImageCaptioner

BLIP, DEEPBOORU, WD14, COCA = "BLIP (WebUI)", "DeepBooru (WebUI)", "WD14 tagger", "CoCa"


@dataclass
class CaptionSources:
    """What a host has for captioning. The WebUI hands in ``shared.interrogator`` and ``modules.deepbooru.model``;
    downloads go to ``models_dir`` (None: the Hugging Face cache)."""

    interrogator: Any = None
    deepbooru: Any = None
    coca_weights: str | None = None
    models_dir: Path | None = None
    allow_download: bool = True
    install: Callable[[str], str | None] | None = None
    device: str = "cpu"

    def wd14_folder(self) -> Path | None:
        return self.models_dir / wd14.DEFAULT_REPO.split("/")[-1] if self.models_dir else None


def names(sources: CaptionSources) -> list[str]:
    """The captioners this host can offer, in the tab's order."""
    webui = [name for name, obj in ((BLIP, sources.interrogator), (DEEPBOORU, sources.deepbooru)) if obj is not None]
    return [*webui, WD14, COCA]


def has_weights(name: str, sources: CaptionSources) -> bool:
    """True when ``name`` can run now without a download or an install (the WebUI's fetch their own)."""
    if name in (BLIP, DEEPBOORU):
        return True
    if name == WD14:
        folder = sources.wd14_folder()
        return (importlib.util.find_spec(wd14.RUNTIME) is not None and folder is not None
                and all((folder / f).is_file() for f in (wd14.MODEL_FILE, wd14.TAGS_FILE)))
    try:
        find_weights(DEFAULT_MODEL, sources.coca_weights or None, sources.models_dir)
    except WeightsMissingError:
        return False
    return True


def default_choice(sources: CaptionSources) -> str:
    """The first captioner that runs without the user doing anything; else CoCa, which downloads on first use."""
    return next((name for name in names(sources) if has_weights(name, sources)), COCA)


def needs_line(sources: CaptionSources, cli: bool = False) -> str:
    """One line naming every captioner and what it needs (for a user with no network and no weights)."""
    folder = sources.wd14_folder() or "a folder"
    coca = "--weights FILE" if cli else "Captioner weights in Settings"
    parts = [f"CoCa needs open_clip's {WEIGHT_FILE_NAMES[1]} ({coca}) or a network once",
             f"WD14 tagger needs onnxruntime and {wd14.MODEL_FILE} + {wd14.TAGS_FILE} in {folder}"
             f"{' (--model wd14 --weights DIR)' if cli else ''} or a network once"]
    webui = "in the WebUI's LoRA Train tab" if cli else "the WebUI fetches their weights on first use (network once)"
    if cli or sources.interrogator is not None or sources.deepbooru is not None:
        parts.insert(0, f"BLIP and DeepBooru: {webui}")
    return "Captioners: " + "; ".join(parts) + "."


def build(name: str, sources: CaptionSources, threshold: float = 0.35) -> ImageCaptioner:
    """Load captioner ``name`` (weights fetched on first use when ``sources.allow_download``)."""
    if name == BLIP:
        from lora_train.caption.webui_interrogators import WebUIBlip

        return WebUIBlip(sources.interrogator)
    if name == DEEPBOORU:
        from lora_train.caption.webui_interrogators import WebUIDeepBooru

        return WebUIDeepBooru(sources.deepbooru)
    if name == WD14:
        return wd14.WD14Tagger.load(sources.wd14_folder(), allow_download=sources.allow_download,
                                    options=wd14.TagOptions(threshold=threshold),
                                    install=sources.install if sources.allow_download else None)
    from lora_train.caption.coca import Captioner

    return Captioner.load(DEFAULT_MODEL, weights=sources.coca_weights or None, models_dir=sources.models_dir,
                          device=sources.device, allow_download=sources.allow_download)
