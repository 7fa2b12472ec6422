"""How captions are decoded and how one caption line is assembled (shared by the CLI and the tab)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lora_train.caption.defaults import CATEGORIES


@dataclass
class DecodeOptions:
    """How captions are decoded. ``beams`` 1 is greedy; more is a small length-normalised beam search."""

    max_new_tokens: int = 30
    min_new_tokens: int = 5
    beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0


@dataclass
class CaptionOptions:
    """How one caption line is assembled: ``trigger, caption, tags`` within ``max_tokens`` CLIP tokens."""

    trigger: str | None = None
    tags_per_category: int = 1
    categories: Sequence[str] = CATEGORIES
    max_tokens: int = 75
    caption: bool = True
    decode: DecodeOptions = field(default_factory=DecodeOptions)
