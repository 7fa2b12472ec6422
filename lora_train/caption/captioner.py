"""Auto-captions with an open_clip CoCa model, plus CLIP-ranked tags from shipped vocabularies.

The caption decoder is our own short loop over pieces of the CoCa model that exist unchanged in
open-clip-torch 2.20 (the WebUI's pin) and 3.x: ``model.visual`` (pooled embedding + image tokens),
``model.text`` (token embeddings, CLS appended) and ``model.text_decoder`` (cross-attends to the image
tokens, returns logits). ``CoCa.generate`` is not used: its beam search needs transformers'
``BeamSearchScorer``, which recent transformers releases broke or removed.

Weights are read from a local file only; a missing file raises WeightsMissingError saying which file to
get and where to put it. ``allow_download=True`` is the only path that lets open_clip download.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from lora_train.caption.defaults import CATEGORIES, DEFAULT_MODEL, VOCAB_DIR
from lora_train.engine import caption_store
from lora_train.engine.weights import WeightsFileError, load_tensors

WEIGHT_FILE_NAMES = ("open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
# open_clip pretrained tag and its hub repository for the CoCa models we know.
PRETRAINED = {
    "coca_ViT-L-14": ("mscoco_finetuned_laion2B-s13B-b90k", "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k"),
    "coca_ViT-B-32": ("mscoco_finetuned_laion2B-s13B-b90k", "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k"),
}
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"


class CaptionerError(RuntimeError):
    """Captioning cannot start; the message says what to fix."""


class WeightsMissingError(CaptionerError, FileNotFoundError):
    """The CoCa weights file is not where we looked; the message names the file and where to put it."""


@dataclass
class DecodeOptions:
    """How captions are decoded. ``beams`` 1 is greedy; more is a small length-normalised beam search."""

    max_new_tokens: int = 30
    min_new_tokens: int = 5
    beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0


@dataclass
class CaptionOptions:
    """How one caption line is assembled: ``trigger, caption, tags`` within ``max_tokens`` CLIP tokens."""

    trigger: str | None = None
    tags_per_category: int = 1
    categories: Sequence[str] = CATEGORIES
    max_tokens: int = 75
    caption: bool = True
    decode: DecodeOptions = field(default_factory=DecodeOptions)


# ---------------------------------------------------------------------------------------------- weights


def weight_candidates(model_name: str, models_dir: str | Path) -> list[Path]:
    """Where a models folder may hold the weights, in search order."""
    models_dir = Path(models_dir)
    in_subfolder = [models_dir / model_name / name for name in WEIGHT_FILE_NAMES]
    beside = [models_dir / f"{model_name}{suffix}" for suffix in (".safetensors", ".bin", ".pt")]
    return in_subfolder + beside + [models_dir / name for name in WEIGHT_FILE_NAMES]


def missing_weights_message(model_name: str, models_dir: str | Path | None, weights: str | Path | None) -> str:
    """Tell the user which file to get and where to put it (we never download without being asked)."""
    tag, repo = PRETRAINED.get(model_name, ("<pretrained tag>", "<hub repository>"))
    where = (
        f"put it at {Path(models_dir) / model_name / WEIGHT_FILE_NAMES[1]} (or .safetensors)"
        if models_dir
        else "pass its path with --weights"
    )
    head = f"CoCa weights not found at {weights}." if weights else f"CoCa weights for {model_name} not found."
    return (
        f"{head} Get open_clip's pretrained '{tag}' for {model_name}: the file {WEIGHT_FILE_NAMES[1]} "
        f"(or {WEIGHT_FILE_NAMES[0]}) from https://huggingface.co/{repo} and {where}. "
        "Or rerun with --allow-download while online."
    )


def find_weights(model_name: str, weights: str | Path | None = None, models_dir: str | Path | None = None) -> Path:
    """Resolve the weights file: an explicit path must exist; else search ``models_dir``."""
    if weights is not None:
        path = Path(weights)
        if path.is_file():
            return path
        raise WeightsMissingError(missing_weights_message(model_name, models_dir, path))
    if models_dir is not None:
        for path in weight_candidates(model_name, models_dir):
            if path.is_file():
                return path
    raise WeightsMissingError(missing_weights_message(model_name, models_dir, None))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch pickle (weights only), unwrapping common containers."""
    path = Path(path)
    try:
        state = load_tensors(path)
    except WeightsFileError as exc:  # corrupt or truncated download: says which file, not a pickle traceback
        raise CaptionerError(str(exc)) from None
    if not isinstance(state, dict) or not state:
        raise CaptionerError(f"{path} holds no state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _check_matches(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, model_name: str) -> None:
    """One line when a weights file is not this model's (torch would list every key, tens of KB of them)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong):
        return
    counts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
              ((missing, "missing"), (unexpected, "unexpected"), (wrong, "of another shape")) if keys]
    tag, repo = PRETRAINED.get(model_name, ("<pretrained tag>", "<hub repository>"))
    raise CaptionerError(
        f"{path} is not open_clip {model_name} weights: of {len(expected)} tensors, {'; '.join(counts)}; "
        f"use the '{tag}' weights from https://huggingface.co/{repo}"
    )


def build_model(model_name: str = DEFAULT_MODEL, model_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """An uninitialised CoCa: from ``model_config`` (open_clip json layout) or open_clip's named config."""
    import open_clip
    from open_clip.coca_model import CoCa

    if model_config is not None:
        cfg = {k: v for k, v in model_config.items() if k not in ("custom_text", "preprocess_cfg")}
        return CoCa(**cfg)
    if model_name not in open_clip.list_models():
        raise CaptionerError(f"Unknown open_clip model {model_name!r}; CoCa models: {coca_models()}")
    return open_clip.create_model(model_name, pretrained=None)


def coca_models() -> list[str]:
    import open_clip

    return [name for name in open_clip.list_models() if name.startswith("coca")]


# ---------------------------------------------------------------------------------------------- captioner


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
        self.vocab_dir = Path(vocab_dir)
        self.sot_id = self.tokenizer.encoder[SOT_TOKEN]
        self.eot_id = self.tokenizer.encoder[EOT_TOKEN]
        self.context_length = int(getattr(model.text, "context_length", 76))
        self.pad_id = int(getattr(model, "pad_id", 0))
        self._vocab_cache: dict[str, tuple[list[str], torch.Tensor]] = {}

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
        """Build the model and load its weights from a local file (see find_weights); no network unless
        ``allow_download`` and the file is missing, then open_clip fetches its pretrained tag."""
        try:
            path = find_weights(model_name, weights, models_dir)
        except WeightsMissingError:
            if not allow_download or model_config is not None:
                raise
            return cls(_download_model(model_name, models_dir), device=device, dtype=dtype)
        model = build_model(model_name, model_config)
        state = read_state_dict(path)
        _check_matches(model, state, path, model_name)
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

    # ------------------------------------------------------------------------------------------ tags

    def vocabulary(self, category: str) -> tuple[list[str], torch.Tensor]:
        """Terms of ``vocab/<category>.txt`` and their normalised text embeddings (computed once)."""
        if category not in self._vocab_cache:
            terms = load_vocab(category, self.vocab_dir)
            embeddings = [self._embed_text(terms[i : i + 64]) for i in range(0, len(terms), 64)]
            self._vocab_cache[category] = (terms, torch.cat(embeddings) if embeddings else torch.empty(0))
        return self._vocab_cache[category]

    @torch.no_grad()
    def _embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        pooled = self.model.text(self.tokenize(texts))[0]
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def rank_tags(
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

    # ------------------------------------------------------------------------------------------ captions

    @torch.no_grad()
    def describe(self, images: Sequence[Image.Image], options: CaptionOptions | None = None) -> list[str]:
        """Finished caption lines for a batch of PIL images: trigger, CoCa caption, ranked tags."""
        options = options or CaptionOptions()
        if not images:
            return []
        embeddings, tokens = self.encode_images(images)
        captions = self.generate(tokens, options.decode) if options.caption else [""] * len(images)
        tags = self.rank_tags(embeddings, options.categories, options.tags_per_category)
        return [
            assemble_caption(options.trigger, caption, image_tags, self.count_tokens, options.max_tokens)
            for caption, image_tags in zip(captions, tags, strict=True)
        ]

    def unload(self) -> None:
        """Drop the model and free its device memory so training can have it."""
        device = self.device
        self.model = None  # type: ignore[assignment]
        self._vocab_cache.clear()
        gc.collect()
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _download_model(model_name: str, models_dir: str | Path | None) -> torch.nn.Module:
    """Opt-in only: let open_clip fetch the pretrained tag into ``models_dir`` (or its cache)."""
    import open_clip

    if model_name not in PRETRAINED:
        raise CaptionerError(f"No known pretrained weights for {model_name}; pass --weights")
    tag = PRETRAINED[model_name][0]
    cache_dir = str(Path(models_dir) / model_name) if models_dir else None
    return open_clip.create_model(model_name, pretrained=tag, cache_dir=cache_dir)


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


# ---------------------------------------------------------------------------------------------- assembly


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
    parts = caption_store.split_tags(caption_store.with_trigger(caption, trigger))
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


# ---------------------------------------------------------------------------------------------- folders


@dataclass
class CaptionReport:
    """What caption_images did: names written, names kept (already captioned), names that failed."""

    output: Path | None = None
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stopped: bool = False

    def failure_message(self) -> str:
        """One message naming every image that could not be read ("" when none failed)."""
        if not self.failed:
            return ""
        lines = [f"  {name}: {reason}" for name, reason in self.failed.items()]
        return f"{len(self.failed)} image(s) could not be captioned:\n" + "\n".join(lines)


def caption_images(
    folder: str | Path,
    captioner: Captioner,
    options: CaptionOptions | None = None,
    mode: caption_store.Mode = "csv",
    csv_path: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    recursive: bool = False,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CaptionReport:
    """Caption the images of ``folder`` into ``metadata.csv`` (``mode="csv"``) or ``.txt`` sidecars.

    Images that already have a non-empty caption are kept unless ``overwrite``. Results are saved after
    every batch, so a stop (``should_stop()`` true) or a crash keeps what was done. Unreadable images do
    not stop the run: they are collected in ``report.failed``. ``on_progress(done, total)`` feeds a UI bar;
    ``progress`` shows a tqdm bar on the console.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    options = options or CaptionOptions()
    images = caption_store.list_images(folder, recursive=recursive)
    existing = caption_store.load_captions(folder, images, mode, csv_path)
    report = CaptionReport(output=caption_store.default_csv_path(folder, csv_path) if mode == "csv" else None)
    todo = [p for p in images if overwrite or not existing.get(caption_store.relative_name(folder, p))]
    pending = set(todo)
    report.kept = [caption_store.relative_name(folder, p) for p in images if p not in pending]
    bar = tqdm(total=len(todo), desc="Captioning", unit="img", disable=not progress)
    try:
        for start in range(0, len(todo), max(1, batch_size)):
            if should_stop is not None and should_stop():
                report.stopped = True
                break
            batch = todo[start : start + max(1, batch_size)]
            new = _caption_batch(folder, batch, captioner, options, report)
            _save(folder, new, mode, csv_path)
            report.written.extend(new)
            bar.update(len(batch))
            if on_progress is not None:
                on_progress(min(start + len(batch), len(todo)), len(todo))
    finally:
        bar.close()
    return report


def _caption_batch(
    folder: Path, batch: list[Path], captioner: Captioner, options: CaptionOptions, report: CaptionReport
) -> dict[str, str]:
    """Open each image (recording the unreadable ones), caption the rest in one forward pass."""
    names, pictures = [], []
    for image in batch:
        name = caption_store.relative_name(folder, image)
        try:
            with Image.open(image) as handle:
                pictures.append(handle.convert("RGB"))
            names.append(name)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            report.failed[name] = f"{type(exc).__name__}: {exc}"
    return dict(zip(names, captioner.describe(pictures, options), strict=True)) if pictures else {}


def _save(folder: Path, captions: dict[str, str], mode: caption_store.Mode, csv_path: str | Path | None) -> None:
    if captions:
        caption_store.save_captions(folder, captions, mode=mode, csv_path=csv_path)


# ---------------------------------------------------------------------------------------------- cache

_LOADED: dict[tuple, Captioner] = {}


def get_captioner(
    model_name: str = DEFAULT_MODEL,
    weights: str | Path | None = None,
    models_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
) -> Captioner:
    """A loaded Captioner, reused across calls with the same arguments (the UI's Caption button)."""
    key = (model_name, str(weights), str(models_dir), str(device))
    if key not in _LOADED:
        unload()
        _LOADED[key] = Captioner.load(
            model_name, weights=weights, models_dir=models_dir, device=device, allow_download=allow_download
        )
    return _LOADED[key]


def unload() -> None:
    """Free the cached captioner's memory (call before training starts); each unload collects and frees."""
    while _LOADED:
        _, captioner = _LOADED.popitem()
        captioner.unload()
