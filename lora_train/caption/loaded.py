"""The captioner the UI keeps loaded between clicks, and freeing it before training."""

from __future__ import annotations

from collections.abc import Callable, Hashable

from lora_train.caption.run import ImageCaptioner

_LOADED: dict[Hashable, ImageCaptioner] = {}


def get_captioner(key: Hashable, build: Callable[[], ImageCaptioner]) -> ImageCaptioner:
    """The captioner loaded for ``key``, built (and any other one freed first) when it is not the one in memory."""
    if key not in _LOADED:
        unload()
        _LOADED[key] = build()
    return _LOADED[key]


def unload() -> None:
    """Free the cached captioner's memory (call before training starts)."""
    while _LOADED:
        _, captioner = _LOADED.popitem()
        captioner.unload()
