"""CLIP tokenizers built offline from the BPE vocabulary that open_clip ships.

Every SD family uses OpenAI's CLIP BPE (SD2/SDXL's OpenCLIP tokenizer is the same vocabulary), so one
local file replaces the hub downloads of openai/clip-vit-large-patch14 and laion's tokenizers.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import CLIPTokenizer

MAX_LENGTH = 77
_MERGES = 49152 - 256 - 2  # as in OpenAI's and open_clip's SimpleTokenizer


def bpe_vocab_path() -> Path:
    """open_clip's bundled vocab file, found without importing open_clip (which imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open-clip-torch is required for the CLIP tokenizer: pip install open-clip-torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall open-clip-torch")
    return path


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable character table (transformers 5 no longer exports it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = [], 0
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [chr(codes[b]) for b in order]


@functools.lru_cache(maxsize=2)
def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIPTokenizer identical to the hub's; SD1/CLIP-L pad with ``<|endoftext|>``, OpenCLIP with ``!``."""
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _MERGES + 1]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        merges_file = Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(
            str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=MAX_LENGTH
        )


def caption_tokenizer() -> Callable[[str], list[str]] | None:
    """The BPE tokenization every SD family's text encoder reads a caption with (no start/end tokens): what the
    dataset doctor counts caption lengths with. None where transformers or open-clip-torch is missing."""
    try:
        return build_clip_tokenizer().tokenize
    except (ModuleNotFoundError, FileNotFoundError):
        return None
