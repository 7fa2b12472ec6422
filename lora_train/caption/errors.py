"""What stops captioning before it starts; every message says what to fix."""

from __future__ import annotations


class CaptionerError(RuntimeError):
    """Captioning cannot start; the message says what to fix."""


class WeightsMissingError(CaptionerError, FileNotFoundError):
    """The CoCa weights file is not where we looked; the message names the file and where to put it."""
