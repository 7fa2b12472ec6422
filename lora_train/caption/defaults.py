"""The captioner's defaults, apart from the model code so the CLI's argparse set-up imports no torch."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "coca_ViT-L-14"
VOCAB_DIR = Path(__file__).parent / "vocab"
CATEGORIES = ("subject", "style", "medium", "colour", "composition", "lighting")
