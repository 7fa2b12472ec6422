"""One spelling for what transformers renamed between the WebUI's 4.30 and current 5.x releases.

transformers 5 calls gradient checkpointing "activation checkpointing" and warns (FutureWarning) on the old
names, which the user would see on every run; 4.x has only the old names.
"""

from __future__ import annotations

from typing import Any


def set_checkpointing(model: Any, enabled: bool) -> None:
    """Turn a transformers model's (gradient/activation) checkpointing on or off under either spelling."""
    state = "enable" if enabled else "disable"
    method = getattr(model, f"activation_checkpointing_{state}", None)
    (method or getattr(model, f"gradient_checkpointing_{state}"))()
