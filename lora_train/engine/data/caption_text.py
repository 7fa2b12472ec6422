"""What a caption says: its tags, the one trigger-word rule, find/replace and tag counts over many captions.

Plain text in, plain text out; where captions are kept is ``caption_store``'s business.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

from lora_train.engine.data.caption_store import CaptionFileError


def find_replace(
    captions: Mapping[str, str | None],
    find: str,
    replace: str,
    regex: bool = False,
    case_sensitive: bool = True,
) -> dict[str, str]:
    """Replace ``find`` in every caption; returns only the captions that changed (feed to save_captions).

    Plain text by default; ``regex`` uses Python ``re`` syntax (``\\1`` back-references in ``replace``).
    An invalid pattern raises CaptionFileError with the regex error; an empty ``find`` changes nothing.
    """
    if not find:
        return {}
    flags = 0 if case_sensitive else re.IGNORECASE
    try:
        pattern = re.compile(find if regex else re.escape(find), flags)
    except re.error as exc:
        raise CaptionFileError(f"Invalid regular expression {find!r}: {exc}") from exc
    replacement = replace if regex else replace.replace("\\", "\\\\")
    changed = {}
    for name, caption in captions.items():
        if not caption:
            continue
        new = _tidy(pattern.sub(replacement, caption))
        if new != caption:
            changed[name] = new
    return changed


def _tidy(caption: str) -> str:
    """Drop empty tags and doubled spaces a replacement leaves behind (``a, , b`` -> ``a, b``)."""
    if "," not in caption:
        return re.sub(r"[ \t]{2,}", " ", caption).strip()
    parts = [re.sub(r"[ \t]{2,}", " ", p).strip() for p in caption.split(",")]
    return ", ".join(p for p in parts if p)


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags of a caption, stripped, empties dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def with_trigger(caption: str, trigger: str | None) -> str:
    """The one trigger-word rule (captioner, tab and trainer): the trigger is the first tag, exactly once.

    A tag equal to the trigger (ignoring case) elsewhere in the caption is dropped; no trigger leaves the
    caption as it is.
    """
    trigger = (trigger or "").strip()
    if not trigger:
        return caption
    rest = [tag for tag in split_tags(caption) if tag.lower() != trigger.lower()]
    return ", ".join([trigger, *rest])


def tag_frequency(captions: Iterable[str | None], case_sensitive: bool = False) -> list[tuple[str, int]]:
    """Count comma-separated tags over all captions, most frequent first (ties alphabetical).

    A tag counts once per caption. Case-insensitive by default (the first spelling seen is shown).
    """
    counts: Counter[str] = Counter()
    shown: dict[str, str] = {}
    for caption in captions:
        if not caption:
            continue
        seen = set()
        for tag in split_tags(caption):
            key = tag if case_sensitive else tag.lower()
            if key in seen:
                continue
            seen.add(key)
            shown.setdefault(key, tag)
            counts[key] += 1
    return sorted(((shown[k], n) for k, n in counts.items()), key=lambda item: (-item[1], item[0].lower()))
