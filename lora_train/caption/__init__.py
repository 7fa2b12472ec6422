"""Captioners that label an image folder; they write through the engine's caption store."""
