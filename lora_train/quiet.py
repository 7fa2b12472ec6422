"""Our messages, not our dependencies': drop the exact lines they print on import that ask nothing of a user.

Each entry names one message of one package (with the versions where it appears); everything else, our own
warnings included, still prints. Called once by the CLI before any heavy import.
"""

from __future__ import annotations

import logging
import warnings

# (category, regex matching the start of the message) of warnings raised at import
_WARNINGS = (
    # diffusers < 0.27 on torch >= 2.2
    (FutureWarning, r"`torch\.utils\._pytree\._register_pytree_node` is deprecated"),
    # open_clip importing timm's old module path (timm >= 0.9)
    (FutureWarning, r"Importing from timm\.models\.layers is deprecated"),
    # a torchvision whose image codecs do not match torch; we never use torchvision.io
    (UserWarning, r"Failed to load image Python extension"),
)


class _DropLine(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# logger name -> filter dropping the record it logs at import
_LOG_LINES = {
    # bitsandbytes 0.50 on an AVX512-BF16 CPU without the optional `kernels` package (imported via peft, accelerate)
    "bitsandbytes.backends.cpu.ops": _DropLine("Failed to load CPU gemm_4bit_forward"),
}


def silence_dependency_noise() -> None:
    """Install the filters; calling it again changes nothing (same filter objects, same warning filters)."""
    for name, line in _LOG_LINES.items():
        logging.getLogger(name).addFilter(line)
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
