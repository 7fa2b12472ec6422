"""Findings about captions: empty ones, ones longer than the text encoder reads, the trigger word, one caption on
every image, tags said twice.

Lengths are counted with the tokenizer the model encodes captions with (``tokenize``: text -> tokens, without the
start/end tokens), on the caption as training sees it (the trigger-word rule applied, the WebUI's prompt syntax
read), cut into the trainer's own 75-token chunks (``prompt_chunks.chunk_line``, comma backtrack and BREAK
included), so "cut from" names the word where training really stops reading.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import caption_text
from lora_train.engine.data.doctor.findings import Finding
from lora_train.engine.data.prompt_chunks import CHUNK_LENGTH, TokenRules, chunk_line, max_chunks
from lora_train.engine.data.prompt_syntax import parse_attention
from lora_train.engine.data.reader import Entry

Tokenize = Callable[[str], list]
TRIGGER_SHARE = 0.5  # a first tag opening at least this share of the captions looks like a trigger word
_START, _END = object(), object()  # stand-ins for the start/end tokens: only the chunk count matters here


def chunk_rules(tokenize: Tokenize) -> TokenRules:
    """The trainer's chunking rules over ``tokenize`` (ids or BPE strings alike: only the comma is compared)."""
    comma = tokenize(",")
    return TokenRules(encode=tokenize, start=_START, end=_END, pad=_END, comma=comma[0] if comma else None)


def _chunks(text: str, rules: TokenRules) -> list[tuple[list, list[float]]]:
    return chunk_line(parse_attention(text), rules)


def _tokens(text: str, rules: TokenRules) -> int:
    """Caption tokens of ``text`` as training reads it (prompt syntax parsed, BREAK not a token)."""
    return sum(len(rules.encode(piece)) for piece, _ in parse_attention(text) if piece != "BREAK")


def cut_point(text: str, chunks: list[tuple[list, list[float]]], rules: TokenRules, limit: int) -> tuple[int, str]:
    """(tokens in the caption, the words from the first one training does not read whole) for a limit of
    ``limit`` chunks, given the caption's ``chunks``. Chunking keeps the tokens in order (a comma backtrack only
    moves a tail on to the next chunk), so training reads the caption's first k tokens, k = what the first
    ``limit`` chunks hold; the cut is the first word whose prefix needs more (a binary search over word prefixes
    with the real tokenizer)."""
    kept = sum(1 for ids, _ in chunks[:limit] for t in ids if t is not _START and t is not _END)
    words = text.split()
    low, high = 0, len(words)
    while low < high:
        middle = (low + high) // 2
        if _tokens(" ".join(words[: middle + 1]), rules) > kept:
            high = middle
        else:
            low = middle + 1
    return _tokens(text, rules), " ".join(words[low:])


def check_captions(entries: list[Entry], cfg: TrainConfig, tokenize: Tokenize | None) -> list[Finding]:
    train = [e for e in entries if e.usable and not e.is_reg]
    findings = [*_empty(train, cfg), *_too_long(train, cfg, tokenize), *_trigger(train, cfg), *_all_same(train, cfg),
                *_repeated_tags(train)]
    return [f for f in findings if f is not None]


def _words(caption: str, trigger: str | None) -> list[str]:
    """The caption's tags other than the trigger word."""
    trigger = (trigger or "").strip().lower()
    return [tag for tag in caption_text.split_tags(caption) if tag.lower() != trigger]


def _empty(train: list[Entry], cfg: TrainConfig) -> list[Finding]:
    empty = [str(e.path) for e in train if not _words(e.caption or "", cfg.trigger_word)]
    if not empty:
        return []
    return [Finding("caption-empty", "warning",
                    f"{len(empty)} image(s) have an empty caption (or the trigger word alone): everything in them "
                    "is tied to the trigger word (or to nothing). Write captions for them.",
                    empty, fix="caption")]


def _too_long(train: list[Entry], cfg: TrainConfig, tokenize: Tokenize | None) -> list[Finding]:
    if tokenize is None:
        return [Finding("caption-length-unchecked", "info",
                        "Caption lengths were not counted: no CLIP tokenizer here (it needs transformers and "
                        "open-clip-torch).")] if train else []
    rules, limit = chunk_rules(tokenize), max_chunks(cfg.max_token_length)
    notes = {}
    for entry in train:
        text = caption_text.with_trigger(entry.caption or "", cfg.trigger_word)
        chunks = _chunks(text, rules)
        if len(chunks) > limit:
            total, dropped = cut_point(text, chunks, rules, limit)
            shown = dropped if len(dropped) <= 60 else dropped[:57] + "..."
            notes[str(entry.path)] = f"{total} tokens; cut from '{shown}'"
    if not notes:
        return []
    tokens = limit * CHUNK_LENGTH
    shuffle = " With shuffle_caption a different tail is lost at each step." if cfg.shuffle_caption else ""
    longer = (" or raise max_token_length (150 or 225: the WebUI reads long prompts in 75-token chunks too)"
              if tokens < 225 else "")
    return [Finding("caption-too-long", "warning",
                    f"{len(notes)} caption(s) are longer than the {tokens} tokens (max_token_length) the text encoder "
                    f"reads in training: the rest never trains.{shuffle} Shorten them (drop tags that say "
                    f"little){longer}.", list(notes), notes)]


def _trigger(train: list[Entry], cfg: TrainConfig) -> list[Finding]:
    """With a trigger word: caption files that lack it first (training adds it; the fix writes it). Without one:
    a word that opens most captions but is missing from others looks like a trigger the user forgot to set."""
    firsts = {str(e.path): (caption_text.split_tags(e.caption or "") or [""])[0] for e in train}
    trigger = (cfg.trigger_word or "").strip()
    if trigger:
        missing = [p for p, first in firsts.items() if first and first.lower() != trigger.lower()]
        if not missing:
            return []
        return [Finding("trigger-not-first", "info",
                        f"{len(missing)} caption(s) do not start with the trigger word '{trigger}': training puts it "
                        "first in every caption anyway. The fix writes it into the caption files so they say what "
                        "trains.", missing, fix="trigger", data={"trigger": trigger})]
    counts = Counter(first.lower() for first in firsts.values() if first)
    if not counts or len(train) < 3:
        return []
    word, count = counts.most_common(1)[0]
    if count < TRIGGER_SHARE * len(train) or count == len(train):
        return []
    spelled = next(first for first in firsts.values() if first.lower() == word)
    missing = [p for p, first in firsts.items() if first and first.lower() != word]
    return [Finding("trigger-inconsistent", "warning",
                    f"'{spelled}' opens {count} of {len(train)} captions but not the {len(missing)} listed: if it is "
                    f"your trigger word, set trigger_word: {spelled} (training then puts it first in every caption) "
                    "or use the fix to write it first.", missing, fix="trigger", data={"trigger": spelled})]


def _all_same(train: list[Entry], cfg: TrainConfig) -> list[Finding]:
    captions = {caption_text.with_trigger(e.caption or "", cfg.trigger_word) for e in train}
    if len(train) < 2 or len(captions) != 1:
        return []
    caption = next(iter(captions))
    return [Finding("caption-all-same", "warning",
                    f"All {len(train)} images have the same caption ('{caption[:60]}'): the LoRA ties everything in "
                    "them to these words and cannot tell them apart. Caption what differs between them (or run a "
                    "captioner).", [str(e.path) for e in train])]


def _repeated_tags(train: list[Entry]) -> list[Finding]:
    notes = {}
    for entry in train:
        tags = [t.lower() for t in caption_text.split_tags(entry.caption or "")]
        repeated = sorted(tag for tag, n in Counter(tags).items() if n > 1)
        if repeated:
            notes[str(entry.path)] = "repeated: " + ", ".join(repeated[:5])
    if not notes:
        return []
    return [Finding("caption-repeated-tags", "info",
                    f"{len(notes)} caption(s) say a tag more than once: it trains with double weight and uses tokens. "
                    "The fix keeps the first of each.", list(notes), notes, fix="tags")]
