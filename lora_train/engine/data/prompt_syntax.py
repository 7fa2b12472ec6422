"""The WebUI's prompt attention syntax, read from captions the way generation reads prompts.

Captions written by the WebUI's DeepBooru or by our WD14 escape brackets (``\\(cosplay\\)``), because the
WebUI's prompt parser reads ``(x)``, ``(x:1.2)`` and ``[x]`` as emphasis and ``\\(`` as a literal bracket.
Training must read the same text, or it learns backslashes the prompt never contains. The grammar is the one
of A1111's ``prompt_parser.parse_prompt_attention`` (v1.10.1), written out here because the engine cannot
import the WebUI; the acceptance tests compare token ids with the WebUI's own parser.
"""

from __future__ import annotations

import re

BREAK_WEIGHT = -1.0  # the parser marks BREAK with this weight; the chunker starts a new chunk there
ROUND, SQUARE = 1.1, 1 / 1.1

_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) pieces: ``(a)`` ×1.1, ``[a]`` ÷1.1, ``(a:w)`` ×w, ``\\(`` a literal bracket, ``BREAK``
    as ``("BREAK", -1)``; unclosed brackets still apply to the end; neighbours of equal weight merge."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append(["BREAK", BREAK_WEIGHT])
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text_piece, weight_value) for text_piece, weight_value in merged]


def plain_text(caption: str) -> str:
    """The text a caption trains with once the syntax is read: escapes undone, emphasis stripped, BREAK kept
    as a space (what the doctor and the tab show as "what the model reads")."""
    return "".join(" " if w == BREAK_WEIGHT else t for t, w in parse_attention(caption))
