"""Training text: ``.jsonl`` / ``.json`` records and plain ``.txt`` files → token ids with a label mask.

Every record becomes a list of segments, each trained on or not: the prompt side of a pair or a conversation
is context only, so the loss falls on response tokens alone. Rendering goes through the tokenizer's chat
template when it has one; without one a prompt is followed by a newline and every response by the EOS token,
which is also what ``generate`` feeds the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_train.engine.data.dataset import DatasetError

IGNORE = -100  # label of a token the loss skips (transformers' and torch's ignore_index)
DATA_SUFFIXES = (".jsonl", ".json", ".txt")
SHAPES = '{"prompt","response"}, {"instruction","input","output"}, {"messages":[...]} or {"text"}'


class DataError(DatasetError):
    """A bad data file or record; the message names the file and line."""


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


@dataclass
class Sample:
    """One tokenized training sequence; ``labels`` is ``input_ids`` with IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    source: str  # file:line, for messages about this sample


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template(tokenizer, messages: list[dict[str, str]], prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as exc:  # jinja's TemplateError, or a template's own raise_exception()
        raise DataError(f"{where}: the tokenizer's chat template refuses this conversation: {exc}") from None


def render_chat(messages: list[dict[str, str]], tokenizer, where: str) -> list[Segment]:
    """A conversation as segments; the assistant turns are the trained ones.

    With a chat template, each assistant turn is what the template adds between the conversation up to that
    turn (with the generation prompt) and the conversation through it.
    """
    if not has_chat_template(tokenizer):
        eos = tokenizer.eos_token or ""
        return [Segment(m["content"] + eos, True) if m["role"] == "assistant" else Segment(m["content"] + "\n", False)
                for m in messages]
    segments, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:index], prompt=True, where=where)
        through = _template(tokenizer, messages[: index + 1], prompt=False, where=where)
        if not before.startswith(done) or not through.startswith(before):
            raise DataError(f"{where}: this tokenizer's chat template does not render a conversation turn by turn; "
                            "use {\"text\"} records with the conversation written out")
        segments += [Segment(before[len(done):], False), Segment(through[len(before):], True)]
        done = through
    return [s for s in segments if s.text]


def prompt_text(prompt: str, tokenizer) -> str:
    """What the model sees before a response to ``prompt``, exactly as training rendered it."""
    messages = [{"role": "user", "content": prompt}]
    if has_chat_template(tokenizer):
        return _template(tokenizer, messages, prompt=True, where="prompt")
    return render_chat(messages, tokenizer, "prompt")[0].text


def _text(record: dict, key: str, where: str, optional: bool = False) -> str:
    if key not in record and not optional:
        raise DataError(f"{where}: missing \"{key}\"; records look like {SHAPES}")
    value = record.get(key, "")
    if not isinstance(value, str) or not (value.strip() or optional):
        raise DataError(f"{where}: \"{key}\" must be non-empty text, got {value!r}")
    return value


def _messages(record: dict, where: str) -> list[dict[str, str]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: each message needs \"role\" system, user or assistant; got {message!r}")
        _text(message, "content", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def record_segments(record: Any, where: str, tokenizer) -> list[Segment]:
    """One record in any of the supported shapes → segments (``where`` is file:line for errors)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object {SHAPES}, got {type(record).__name__}")
    if "messages" in record:
        return render_chat(_messages(record, where), tokenizer, where)
    if "prompt" in record or "response" in record:
        pair = (_text(record, "prompt", where), _text(record, "response", where))
    elif "instruction" in record:
        extra = _text(record, "input", where, optional=True)
        instruction = _text(record, "instruction", where)
        pair = (f"{instruction}\n\n{extra}" if extra.strip() else instruction, _text(record, "output", where))
    elif "text" in record:
        return [Segment(_text(record, "text", where) + (tokenizer.eos_token or ""), True)]
    else:
        raise DataError(f"{where}: expected {SHAPES}; got keys {sorted(record)}")
    turns = [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return render_chat(turns, tokenizer, where)


def _json_records(path: Path) -> Iterator[tuple[Any, str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json file must hold a list of records; use .jsonl for one per line")
        yield from ((record, f"{path} record {i + 1}") for i, record in enumerate(records))
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{path}:{number}"
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _text_samples(path: Path) -> Iterator[tuple[str, str]]:
    """One sample per line, or per blank-line-separated block when the file has blank lines between text."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[tuple[int, list[str]]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            blocks.append((number + 1, []))
        elif blocks and blocks[-1][1]:
            blocks[-1][1].append(line)
        else:
            blocks.append((number, [line]))
    filled = [(number, block) for number, block in blocks if block]
    if len(filled) == 1:  # no blank lines: every line is a sample
        filled = [(number, [line]) for number, line in enumerate(lines, 1) if line.strip()]
    yield from ((f"{path}:{number}", "\n".join(block)) for number, block in filled)


def data_files(path: str | Path) -> list[Path]:
    """The data file, or every data file below a folder, in a stable order."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(f"{path}: expected a {', '.join(DATA_SUFFIXES)} file")
        return [path]
    if not path.is_dir():
        raise DataError(f"train_data_dir {str(path)!r} not found; point it at a .jsonl/.txt file or a folder")
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))  # no hidden files
    if not files:
        raise DataError(f"{path} holds no {', '.join(DATA_SUFFIXES)} files")
    return files


def read_segments(path: str | Path, tokenizer) -> list[tuple[list[Segment], str]]:
    """Every record of a file or folder as (segments, where)."""
    result = []
    for file in data_files(path):
        if file.suffix == ".txt":
            eos = tokenizer.eos_token or ""
            result += [([Segment(text + eos, True)], where) for where, text in _text_samples(file)]
        else:
            result += [(record_segments(record, where, tokenizer), where) for record, where in _json_records(file)]
    if not result:
        raise DataError(f"{path} holds no training records")
    return result


def tokenize(segments: list[Segment], tokenizer, where: str) -> Sample:
    """Token ids of the whole rendered text, labelled where a token starts inside a trained segment.

    The text is tokenized in one piece (as the template means it) and the mask comes from character offsets.
    """
    text, spans, start = "", [], 0
    for segment in segments:
        text += segment.text
        if segment.trained:
            spans.append((start, len(text)))
        start = len(text)
    special = not has_chat_template(tokenizer)  # a template writes its own BOS
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    labels = []
    for token, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        trained = end > begin and any(lo <= begin < hi for lo, hi in spans)
        labels.append(token if trained else IGNORE)
    return Sample(list(encoded["input_ids"]), labels, where)


def pack(samples: list[Sample], length: int) -> list[Sample]:
    """Concatenate samples and cut them into ``length``-token blocks (``packing: true``)."""
    ids = [t for s in samples for t in s.input_ids]
    labels = [t for s in samples for t in s.labels]
    return [Sample(ids[i : i + length], labels[i : i + length], f"packed block {i // length + 1}")
            for i in range(0, len(ids), length)]


def load_samples(path: str | Path, tokenizer, max_seq_length: int, packing: bool = False) -> tuple[list[Sample], int]:
    """Tokenized samples, cut to ``max_seq_length``; also how many were dropped for keeping no response token."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the label mask needs a fast tokenizer (a tokenizer.json in the model folder)")
    samples = [tokenize(segments, tokenizer, where) for segments, where in read_segments(path, tokenizer)]
    if packing:
        samples = pack(samples, max_seq_length)
    kept = []
    for sample in samples:
        sample.input_ids, sample.labels = sample.input_ids[:max_seq_length], sample.labels[:max_seq_length]
        if any(label != IGNORE for label in sample.labels):
            kept.append(sample)
    if not kept:
        raise DataError(f"{path}: no sample keeps a response token within max_seq_length {max_seq_length}; "
                        "raise max_seq_length")
    return kept, len(samples) - len(kept)
