"""What stops captioning before it starts; every message says what to fix."""

from __future__ import annotations


class CaptionerError(RuntimeError):
    """Captioning cannot start; the message says what to fix."""


class WeightsMissingError(CaptionerError, FileNotFoundError):
    """A captioner's weights are not on this machine and could not be downloaded.

    The message names the file and where to get it; ``downloads_off`` tells the caller to point at its own way of
    allowing downloads (a CLI flag, a tab setting), which the message leaves out.
    """

    def __init__(self, message: str, downloads_off: bool = False) -> None:
        super().__init__(message)
        self.downloads_off = downloads_off
