"""Find the errors in a WebUI log: plain and indented Python tracebacks, rich traceback boxes and ``*** Error``
reports, each as one block of text, so a check can tell ours from other extensions'."""

from __future__ import annotations

import re

_START = re.compile(r"Traceback \(most recent call last\)|^\*\*\* |^API error: ")
# lines that continue a block: indented frames, rich's box, the "---" that ends errors.report
_CONTINUES = re.compile(r"^(\s|│|╭|╰|---|\*\*\* |$)")


def error_blocks(text: str) -> list[str]:
    """Each error in the log with its traceback; a plain traceback keeps its final exception line."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not _START.search(lines[i]):
            i += 1
            continue
        end = i + 1
        while end < len(lines) and _CONTINUES.match(lines[end]) and not lines[end].startswith("Traceback"):
            end += 1
        closed = lines[end - 1].startswith("---") or not any("Traceback" in line for line in lines[i:end])
        if end < len(lines) and not closed and lines[end].strip():
            end += 1  # the exception line that closes a plain or rich traceback ("ValueError: ...")
        blocks.append("\n".join(lines[i:end]))
        i = end
    return blocks


def mentions(block: str, names: tuple[str, ...]) -> bool:
    lowered = block.lower()
    return any(name in lowered for name in names)
