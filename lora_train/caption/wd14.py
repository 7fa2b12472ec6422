"""WD14 tags: SmilingWolf's ONNX taggers (``model.onnx`` + ``selected_tags.csv``), run with onnxruntime.

The model takes NHWC float32 BGR pixels in 0..255, the image padded to a white square; it returns one sigmoid
probability per row of ``selected_tags.csv`` (columns tag_id,name,category,count; category 9 rating, 0 general,
4 character). Tags are written as the WebUI expects them in a prompt: spaces for underscores (kaomoji like
``^_^`` kept), parentheses escaped.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lora_train.caption.download import hub_file
from lora_train.caption.errors import CaptionerError
from lora_train.caption.options import CaptionOptions
from lora_train.engine.data import caption_text

DEFAULT_REPO = "SmilingWolf/wd-vit-tagger-v3"
MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4
# tags whose underscore is part of the face they draw
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}
RUNTIME = "onnxruntime"


@dataclass
class TagOptions:
    """Which WD14 tags make it into a caption, and how they are written."""

    threshold: float = 0.35
    character_threshold: float = 0.85
    ratings: bool = False
    spaces: bool = True
    escape: bool = True


def read_tags(path: Path) -> list[tuple[str, int]]:
    """(name, category) per row of ``selected_tags.csv``, in the model's output order."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return [(row["name"], int(row["category"])) for row in csv.DictReader(handle)]
    except (KeyError, ValueError) as exc:
        raise CaptionerError(f"{path} is not a WD14 selected_tags.csv (tag_id,name,category,count): {exc}") from None


def format_tag(name: str, options: TagOptions) -> str:
    """A tag as the WebUI reads it in a prompt: ``long_hair`` -> ``long hair``, ``(cosplay)`` -> ``\\(cosplay\\)``."""
    if options.spaces and name not in KAOMOJI:
        name = name.replace("_", " ")
    if options.escape:
        name = name.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return name


def import_runtime(install: Callable[[str], str | None] | None = None) -> Any:
    """onnxruntime, installed first through ``install`` (the extension's constrained pip) when it is missing."""
    try:
        import onnxruntime
    except ImportError:
        if install is None:
            raise CaptionerError("The WD14 tagger needs onnxruntime: pip install onnxruntime") from None
        print("[lora-train] installing onnxruntime for the WD14 tagger (nothing installed is changed)")
        error = install(RUNTIME)
        if error:
            raise CaptionerError(f"The WD14 tagger needs onnxruntime, which could not be installed: {error}") from None
        import onnxruntime
    return onnxruntime


class WD14Tagger:
    """One ONNX tagger session and its tag list; ``describe`` turns images into caption lines."""

    def __init__(self, session: Any, tags: list[tuple[str, int]], options: TagOptions | None = None) -> None:
        self.session = session
        self.tags = tags
        self.options = options or TagOptions()
        model_input = session.get_inputs()[0]
        self.input_name = model_input.name
        self.size = int(model_input.shape[1])
        self.batched = not isinstance(model_input.shape[0], int) or model_input.shape[0] != 1
        outputs = int(session.get_outputs()[0].shape[1])
        if outputs != len(tags):
            raise CaptionerError(f"The WD14 model has {outputs} outputs but its {TAGS_FILE} lists {len(tags)} tags")

    @classmethod
    def load(
        cls,
        folder: str | Path | None = None,
        repo: str = DEFAULT_REPO,
        allow_download: bool = True,
        options: TagOptions | None = None,
        install: Callable[[str], str | None] | None = None,
    ) -> WD14Tagger:
        """From ``folder`` (model.onnx + selected_tags.csv; fetched there from ``repo`` when missing and allowed)
        or, without a folder, from the hub cache."""
        runtime = import_runtime(install)
        where = Path(folder) if folder else None
        files = [hub_file(repo, name, where, allow_download, f"WD14 {name} of {repo}")
                 for name in (MODEL_FILE, TAGS_FILE)]
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in runtime.get_available_providers()] or None
        try:
            session = runtime.InferenceSession(str(files[0]), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CaptionerError(f"{files[0]} is not a loadable ONNX model: {exc}") from None
        return cls(session, read_tags(files[1]), options)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """HWC float32 BGR 0..255: pasted centred on a white square, resized to the model's input size."""
        image = image.convert("RGBA")
        side = max(image.size)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        square.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
        resized = square.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        return np.asarray(resized, dtype=np.float32)[:, :, ::-1]

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[images, tags] sigmoid probabilities."""
        if self.session is None:
            raise CaptionerError("The WD14 tagger was unloaded")
        batch = np.ascontiguousarray(np.stack([self.pixels(image) for image in images]))
        output = self.session.get_outputs()[0].name
        if self.batched:
            return self.session.run([output], {self.input_name: batch})[0]
        return np.concatenate([self.session.run([output], {self.input_name: row[None]})[0] for row in batch])

    def select(self, probabilities: np.ndarray) -> list[str]:
        """The caption's tags for one image: best rating (when on), characters, then general tags, likeliest first."""
        opts = self.options
        scored = sorted(zip(probabilities.tolist(), self.tags, strict=True), key=lambda item: -item[0])
        ratings = [name for _, (name, category) in scored if category == RATING][:1] if opts.ratings else []
        characters = [name for p, (name, cat) in scored if cat == CHARACTER and p >= opts.character_threshold]
        general = [name for p, (name, cat) in scored if cat == GENERAL and p >= opts.threshold]
        return [format_tag(name, opts) for name in ratings + characters + general]

    def describe(self, images: Sequence[Image.Image], options: CaptionOptions | None = None) -> list[str]:
        """Caption lines: the trigger word, then the tags."""
        trigger = options.trigger if options else None
        if not images:
            return []
        rows = self.probabilities(images)
        return [caption_text.with_trigger(", ".join(self.select(row)), trigger) for row in rows]

    def unload(self) -> None:
        """Drop the session (its memory goes with it)."""
        self.session = None
