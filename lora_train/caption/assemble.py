"""One caption line: ``trigger, caption, tag, ...`` within the text encoder's token limit."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from lora_train.engine.data import caption_text


def assemble_caption(
    trigger: str | None,
    caption: str,
    tags: Sequence[str],
    count_tokens: Callable[[str], int],
    max_tokens: int = 75,
) -> str:
    """``trigger, caption, tag, ...``: trigger first, repeats dropped, within ``max_tokens`` tokens.

    A tag is a repeat when it equals an earlier part or appears as a whole phrase inside the caption
    (case-insensitive). Tags that do not fit are left out from the end; a caption that alone is too long is
    cut at a word boundary. The trigger is always kept.
    """
    parts = caption_text.split_tags(caption_text.with_trigger(caption, trigger))
    kept = parts[:1] if (trigger or "").strip() else []
    caption_parts = parts[len(kept):]
    candidates: list[str] = []
    for part in [*caption_parts, *(t.strip() for t in tags)]:
        if part and not any(_same(part, p) or _inside(part, p) for p in [*kept, *candidates]):
            candidates.append(part)
    for index, part in enumerate(candidates):
        if count_tokens(", ".join([*kept, part])) <= max_tokens:
            kept.append(part)
            continue
        if index == 0:  # the caption itself is too long: keep what fits of it
            cut = _cut_to_fit(kept, part, count_tokens, max_tokens)
            kept.extend([cut] if cut else [])
        break
    return ", ".join(kept)


def _same(a: str, b: str) -> bool:
    return bool(a) and a.strip().lower() == b.strip().lower()


def _inside(tag: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(tag.strip().lower())}(?!\w)", text.lower()) is not None


def _cut_to_fit(fitted: list[str], part: str, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    """Longest word prefix of ``part`` that still fits after ``fitted`` ("" when nothing fits)."""
    words = part.split()
    while words and count_tokens(", ".join([*fitted, " ".join(words)])) > max_tokens:
        words.pop()
    return " ".join(words)
