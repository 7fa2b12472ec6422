"""Auto-captions with an open_clip CoCa model: its caption decoder, plus CLIP-ranked vocabulary tags.

The caption decoder is our own short loop over pieces of the CoCa model that exist unchanged in
open-clip-torch 2.20 (the WebUI's pin) and 3.x: ``model.visual`` (pooled embedding + image tokens),
``model.text`` (token embeddings, CLS appended) and ``model.text_decoder`` (cross-attends to the image
tokens, returns logits). ``CoCa.generate`` is not used: its beam search needs transformers'
``BeamSearchScorer``, which recent transformers releases broke or removed.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from lora_train.caption.assemble import assemble_caption
from lora_train.caption.coca_weights import (
    DEFAULT_MODEL,
    build_model,
    check_matches,
    download_weights,
    find_weights,
    read_state_dict,
)
from lora_train.caption.defaults import VOCAB_DIR
from lora_train.caption.errors import WeightsMissingError
from lora_train.caption.options import CaptionOptions, DecodeOptions
from lora_train.caption.tags import VocabularyTags

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"


class Captioner:
    """A CoCa model, its tokenizer and preprocess on one device; captions PIL images in batches.

    Build with ``Captioner.load(...)`` (weights from a file) or pass already-built pieces (tests, or a
    caller that has them). Call ``unload()`` to hand the device memory back before training.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        vocab_dir: str | Path = VOCAB_DIR,
    ) -> None:
        import open_clip

        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer or open_clip.tokenizer.SimpleTokenizer()
        self.preprocess = preprocess or open_clip.image_transform(_image_size(model), is_train=False)
        self.tags = VocabularyTags(self._embed_text, vocab_dir)
        self.sot_id = self.tokenizer.encoder[SOT_TOKEN]
        self.eot_id = self.tokenizer.encoder[EOT_TOKEN]
        self.context_length = int(getattr(model.text, "context_length", 76))
        self.pad_id = int(getattr(model, "pad_id", 0))

    @classmethod
    def load(
        cls,
        model_name: str = DEFAULT_MODEL,
        weights: str | Path | None = None,
        models_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        model_config: dict[str, Any] | None = None,
        allow_download: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Captioner:
        """Build the model and load its weights: a local file (see find_weights), else open_clip's pretrained
        weights downloaded on first use when ``allow_download`` (a named model without --weights only)."""
        try:
            path = find_weights(model_name, weights, models_dir)
        except WeightsMissingError:
            if weights is not None or model_config is not None:
                raise
            path = download_weights(model_name, models_dir, allow_download)
        model = build_model(model_name, model_config)
        state = read_state_dict(path)
        check_matches(model, state, path, model_name)
        model.load_state_dict(state, strict=True)
        return cls(model, device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------ text

    def count_tokens(self, text: str) -> int:
        """CLIP BPE tokens of ``text`` without start/end tokens (the same BPE as SD's text encoder)."""
        return len(self.tokenizer.encode(text))

    def decode_tokens(self, ids: Iterable[int]) -> str:
        return _clean_caption(self.tokenizer.decode([int(i) for i in ids]))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids padded with 0 to the text tower's context length, ``<sot> ... <eot>``."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.tokenizer.encode(text)][: self.context_length - 1] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out.to(self.device)

    # ------------------------------------------------------------------------------------------ images

    def encode_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised pooled embeddings [B, D], image tokens [B, N, W]) for the decoder."""
        pixels = torch.stack([self.preprocess(img.convert("RGB")) for img in images])
        pooled, tokens = self.model.visual(pixels.to(self.device, self.dtype))
        return F.normalize(pooled.float(), dim=-1), tokens

    @torch.no_grad()
    def generate(self, image_tokens: torch.Tensor, options: DecodeOptions | None = None) -> list[str]:
        """CoCa captions for a batch of image tokens (from encode_images)."""
        options = options or DecodeOptions()
        limit = max(1, min(options.max_new_tokens, self.context_length - 1))
        if options.beams > 1:
            ids = self._beam_search(image_tokens, options, limit)
        else:
            ids = self._greedy(image_tokens, options, limit)
        return [self.decode_tokens(_until_eot(row[1:].tolist(), self.eot_id)) for row in ids]

    def _next_logits(self, ids: torch.Tensor, image_tokens: torch.Tensor, step: int, options: DecodeOptions):
        _, token_embs = self.model.text(ids)
        logits = self.model.text_decoder(image_tokens, token_embs)[:, -1].float()
        logits[:, [self.sot_id, self.pad_id]] = -float("inf")  # pad (0, '!') is never a caption token
        if step < options.min_new_tokens:
            logits[:, self.eot_id] = -float("inf")
        if options.repetition_penalty != 1.0:
            seen = torch.gather(logits, 1, ids)
            seen = torch.where(seen > 0, seen / options.repetition_penalty, seen * options.repetition_penalty)
            logits.scatter_(1, ids, seen)
        return logits

    def _greedy(self, image_tokens: torch.Tensor, options: DecodeOptions, limit: int) -> torch.Tensor:
        batch = image_tokens.shape[0]
        ids = torch.full((batch, 1), self.sot_id, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(limit):
            next_ids = self._next_logits(ids, image_tokens, step, options).argmax(dim=-1)
            next_ids = torch.where(done, torch.full_like(next_ids, self.eot_id), next_ids)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            done |= next_ids == self.eot_id
            if bool(done.all()):
                break
        return ids

    def _beam_search(self, image_tokens: torch.Tensor, options: DecodeOptions, limit: int) -> torch.Tensor:
        """Plain beam search; a finished beam only extends with <eot> at no cost, scores are length-normed."""
        batch, beams = image_tokens.shape[0], options.beams
        image_tokens = image_tokens.repeat_interleave(beams, dim=0)
        ids = torch.full((batch * beams, 1), self.sot_id, dtype=torch.long, device=self.device)
        scores = torch.full((batch, beams), -float("inf"), device=self.device)
        scores[:, 0] = 0.0
        done = torch.zeros(batch * beams, dtype=torch.bool, device=self.device)
        lengths = torch.zeros(batch * beams, device=self.device)
        offsets = (torch.arange(batch, device=self.device) * beams)[:, None]
        for step in range(limit):
            logp = F.log_softmax(self._next_logits(ids, image_tokens, step, options), dim=-1)
            logp[done] = -float("inf")
            logp[done, self.eot_id] = 0.0
            vocab = logp.shape[-1]
            total = (scores.reshape(-1, 1) + logp).reshape(batch, beams * vocab)
            scores, flat = total.topk(beams, dim=1)
            origin = (offsets + torch.div(flat, vocab, rounding_mode="floor")).reshape(-1)
            tokens = (flat % vocab).reshape(-1)
            ids = torch.cat([ids[origin], tokens[:, None]], dim=1)
            lengths = lengths[origin] + (~done[origin]).float()
            done = done[origin] | (tokens == self.eot_id)
            if bool(done.all()):
                break
        normed = scores / lengths.reshape(batch, beams).clamp(min=1) ** options.length_penalty
        best = (offsets[:, 0] + normed.argmax(dim=1)).reshape(-1)
        return ids[best]

    @torch.no_grad()
    def _embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        pooled = self.model.text(self.tokenize(texts))[0]
        return F.normalize(pooled.float(), dim=-1)



    @torch.no_grad()
    def describe(self, images: Sequence[Image.Image], options: CaptionOptions | None = None) -> list[str]:
        """Finished caption lines for a batch of PIL images: trigger, CoCa caption, ranked tags."""
        options = options or CaptionOptions()
        if not images:
            return []
        embeddings, tokens = self.encode_images(images)
        captions = self.generate(tokens, options.decode) if options.caption else [""] * len(images)
        tags = self.tags.rank(embeddings, options.categories, options.tags_per_category)
        return [
            assemble_caption(options.trigger, caption, image_tags, self.count_tokens, options.max_tokens)
            for caption, image_tags in zip(captions, tags, strict=True)
        ]

    def unload(self) -> None:
        """Drop the model and free its device memory so training can have it."""
        device = self.device
        self.model = None  # type: ignore[assignment]
        self.tags.clear()
        gc.collect()
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _image_size(model: torch.nn.Module) -> int | tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (list, tuple)) else int(size)


def _until_eot(ids: list[int], eot_id: int) -> list[int]:
    return ids[: ids.index(eot_id)] if eot_id in ids else ids


def _clean_caption(text: str) -> str:
    """Tidy decoded BPE text: drop broken bytes, collapse spaces, drop a trailing full stop."""
    text = re.sub(r"\s+", " ", text.replace("\ufffd", "")).strip()
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)
    return text.rstrip(" .").strip()

