"""Tags ranked by CLIP similarity from the shipped vocabularies (``vocab/<category>.txt``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lora_train.caption.defaults import CATEGORIES, VOCAB_DIR
from lora_train.caption.errors import CaptionerError


def load_vocab(category: str, vocab_dir: str | Path = VOCAB_DIR) -> list[str]:
    """Terms of one vocabulary file: one a line, blank lines and ``#`` comments skipped, no repeats."""
    path = Path(vocab_dir) / f"{category}.txt"
    if not path.is_file():
        raise CaptionerError(f"Tag vocabulary not found: {path} (categories: {', '.join(CATEGORIES)})")
    terms: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        term = line.strip()
        if term and not term.startswith("#") and term not in terms:
            terms.append(term)
    return terms


class VocabularyTags:
    """Ranks vocabulary terms against image embeddings; term embeddings come from ``embed_text`` once each."""

    def __init__(self, embed_text: Callable[[Sequence[str]], torch.Tensor], vocab_dir: str | Path = VOCAB_DIR):
        self.embed_text = embed_text
        self.vocab_dir = Path(vocab_dir)
        self._cache: dict[str, tuple[list[str], torch.Tensor]] = {}

    def vocabulary(self, category: str) -> tuple[list[str], torch.Tensor]:
        """Terms of ``vocab/<category>.txt`` and their normalised text embeddings (computed once)."""
        if category not in self._cache:
            terms = load_vocab(category, self.vocab_dir)
            embeddings = [self.embed_text(terms[i : i + 64]) for i in range(0, len(terms), 64)]
            self._cache[category] = (terms, torch.cat(embeddings) if embeddings else torch.empty(0))
        return self._cache[category]

    @torch.no_grad()
    def rank(
        self, image_embeddings: torch.Tensor, categories: Sequence[str] = CATEGORIES, per_category: int = 1
    ) -> list[list[str]]:
        """Best ``per_category`` terms of each vocabulary by cosine similarity, per image, category order."""
        result: list[list[str]] = [[] for _ in range(image_embeddings.shape[0])]
        if per_category <= 0:
            return result
        for category in categories:
            terms, embeddings = self.vocabulary(category)
            if not terms:
                continue
            top = (image_embeddings @ embeddings.T).topk(min(per_category, len(terms)), dim=1).indices
            for row, indices in enumerate(top.tolist()):
                result[row].extend(terms[i] for i in indices)
        return result

    def clear(self) -> None:
        self._cache.clear()
