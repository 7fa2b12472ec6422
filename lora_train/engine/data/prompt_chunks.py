"""Captions as the WebUI's text encoders see them: 75-token chunks, each wrapped in start/end tokens.

The WebUI (A1111 ``sd_hijack_clip.TextConditionalModel.tokenize_line``) never truncates a prompt: it cuts the
tokens into chunks of 75, moves a short tail after the last comma into the next chunk ("Prompt word wrap
length limit", 20 tokens), pads each chunk with end tokens to 75, adds a start and an end token, encodes every
chunk on its own and concatenates the outputs (77, 154, 231 ... tokens of context). ``BREAK`` starts a new
chunk. Training with the same chunks makes a caption condition the UNet the way the same prompt will at
generation. kohya's ``max_token_length`` (75, 150, 225) caps the number of chunks (1, 2, 3); what is beyond
is cut off, as kohya cuts it.

Written here rather than called from the WebUI because the engine must not import it and the CLI has no WebUI;
``tests/webui`` compares the result with the WebUI's own ``get_learned_conditioning``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_train.engine.data.prompt_syntax import BREAK_WEIGHT, parse_attention

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20  # the WebUI's default "Prompt word wrap length limit" (comma_padding_backtrack)
TOKEN_LENGTHS = (75, 150, 225)


@dataclass(frozen=True)
class TokenRules:
    """How one text encoder turns text into ids: its BPE (no special tokens) and its special ids.

    ``pad`` fills the chunk after its first end token (SD1's CLIP pads with the end token, OpenCLIP with 0),
    as the WebUI does before encoding.
    """

    encode: Callable[[str], list[int]]
    start: int
    end: int
    pad: int
    comma: int | None


@dataclass
class PromptTokens:
    """A batch of captions in chunks: per text encoder ids [batch, chunks * 77] and emphasis multipliers of the
    same shape (all 1.0 unless ``weighted_captions``)."""

    ids: list[torch.Tensor]
    multipliers: list[torch.Tensor]

    @property
    def chunks(self) -> int:
        return self.ids[0].shape[1] // (CHUNK_LENGTH + 2)


def max_chunks(max_token_length: int) -> int:
    """kohya's max_token_length (75/150/225) as the number of 75-token chunks."""
    return max(1, max_token_length // CHUNK_LENGTH)


def chunk_line(
    pieces: Sequence[tuple[str, float]], rules: TokenRules, backtrack: int = COMMA_BACKTRACK
) -> list[tuple[list[int], list[float]]]:
    """(ids, multipliers) of each 77-token chunk of one parsed prompt, as the WebUI's ``tokenize_line``."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        fill = CHUNK_LENGTH - len(tokens)
        chunk_ids = [rules.start, *tokens, *([rules.end] * fill), rules.end]
        chunks.append((chunk_ids, [1.0, *weights, *([1.0] * fill), 1.0]))
        tokens, weights, last_comma = [], [], -1

    for text, weight in pieces:
        if text == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        for token in rules.encode(text):
            if token == rules.comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == CHUNK_LENGTH and last_comma != -1 and (
                len(tokens) - last_comma <= backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_LENGTH:
                close_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close_chunk()
    return chunks


def empty_chunk(rules: TokenRules) -> tuple[list[int], list[float]]:
    """What the WebUI pads a shorter prompt of a batch with: start, then end tokens."""
    return [rules.start, *([rules.end] * (CHUNK_LENGTH + 1))], [1.0] * (CHUNK_LENGTH + 2)


def pad_after_end(chunk_ids: list[int], end: int, pad: int) -> list[int]:
    """A chunk as its text encoder reads it: everything after the first end token is ``pad`` (the WebUI's
    ``process_tokens``; OpenCLIP pads with 0, SD1's CLIP with the end token itself)."""
    first_end = chunk_ids.index(end)
    return chunk_ids[: first_end + 1] + [pad] * (len(chunk_ids) - first_end - 1)


def tokenize_captions(
    captions: Sequence[str], rules: Sequence[TokenRules], limit: int, parse: bool = True, weighted: bool = False,
) -> PromptTokens:
    """Chunks of every caption for every text encoder, at most ``limit`` chunks each; a batch gets as many
    chunks as its longest caption needs, the others padded with empty chunks (as the WebUI pads a batch).

    ``parse`` reads the WebUI's prompt syntax (escaped brackets, emphasis, BREAK); off, the text is literal.
    The pieces are tokenized one by one as the WebUI does; their emphasis weights become the multipliers only
    when ``weighted`` (kohya's ``weighted_captions``), else every multiplier is 1 (emphasis stripped to text).
    """
    pieces = [parse_attention(c) if parse else [(c, 1.0)] for c in captions]
    ids, multipliers = [], []
    for rule in rules:
        lines = [chunk_line(p, rule)[:limit] for p in pieces]
        count = max(len(line) for line in lines)
        batch_ids, batch_weights = [], []
        for line in lines:
            line = line + [empty_chunk(rule)] * (count - len(line))
            row_ids = []
            for chunk_ids, _ in line:
                row_ids += pad_after_end(chunk_ids, rule.end, rule.pad)
            batch_ids.append(row_ids)
            batch_weights.append([w if weighted else 1.0 for _, chunk_weights in line for w in chunk_weights])
        ids.append(torch.tensor(batch_ids, dtype=torch.long))
        multipliers.append(torch.tensor(batch_weights, dtype=torch.float32))
    return PromptTokens(ids, multipliers)


def split_chunks(ids: torch.Tensor) -> list[torch.Tensor]:
    """[batch, n*77] → n tensors [batch, 77], each encoded on its own."""
    return list(ids.split(CHUNK_LENGTH + 2, dim=1))


def apply_emphasis(context: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """The WebUI's "Original" emphasis on one chunk: scale each token's features by its multiplier, then restore
    the mean. Per sample here (the WebUI's batch is one prompt), so batch neighbours do not change a caption."""
    if bool((multipliers == 1).all()):
        return context
    multipliers = multipliers.to(context.device, context.dtype)
    old_mean = context.mean(dim=(1, 2), keepdim=True)
    weighted = context * multipliers[..., None]
    return weighted * (old_mean / weighted.mean(dim=(1, 2), keepdim=True))


def encode_chunks(
    ids: torch.Tensor, multipliers: torch.Tensor,
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode each 77-token chunk on its own, apply its emphasis, concatenate the contexts; the pooled vector
    (SDXL) is the first chunk's, as in the WebUI and kohya."""
    contexts, pooled = [], None
    for index, (chunk, weights) in enumerate(zip(split_chunks(ids), split_chunks(multipliers), strict=True)):
        context, pool = encode(chunk)
        contexts.append(apply_emphasis(context, weights))
        if index == 0:
            pooled = pool
    return torch.cat(contexts, dim=1), pooled


def hf_rules(tokenizer: Any, pad: int | None = None) -> TokenRules:
    """Rules of a transformers CLIPTokenizer; ``pad`` defaults to its pad token (SD1's end token, the ``!`` of
    diffusers' SD2 and SDXL second tokenizers)."""
    return TokenRules(
        encode=lambda text: tokenizer(text, add_special_tokens=False, truncation=False).input_ids,
        start=tokenizer.bos_token_id, end=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id if pad is None else pad,
        comma=tokenizer.get_vocab().get(",</w>"),
    )
