"""Training images: the items training reads, aspect-ratio buckets, pixels, batches.

What a folder holds (kohya's ``N_name`` repeats, captions, headers, loss masks) is ``reader``'s; every problem in
it (unreadable file, missing caption) is reported in one error, so a user fixes the folder once instead of once per
image.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import caption_text, images, reader
from lora_train.engine.data.reader import DatasetError


@dataclass
class ImageItem:
    path: Path
    caption: str
    repeats: int
    is_reg: bool
    subset: str
    size: tuple[int, int]  # (width, height) after EXIF rotation
    bucket: tuple[int, int] = (0, 0)  # (width, height) it is trained at
    crop: tuple[int, int] = (0, 0)  # (top, left) of the crop, set when the image is loaded
    mask_path: Path | None = None  # its loss mask in conditioning_data_dir (masked_loss)

    def size_ids(self) -> list[int]:
        """SDXL's size conditioning: original h, w, crop top, left, target h, w."""
        return [self.size[1], self.size[0], *self.crop, self.bucket[1], self.bucket[0]]


@dataclass
class Dataset:
    items: list[ImageItem]
    buckets: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_train_images(self) -> int:
        return sum(item.repeats for item in self.items if not item.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(item.repeats for item in self.items if item.is_reg)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ss_tag_frequency: per subset folder, how often each comma-separated tag appears."""
        freq: dict[str, Counter] = {}
        for item in self.items:
            tags = [t.strip() for t in item.caption.split(",") if t.strip()]
            freq.setdefault(item.subset, Counter()).update(tags)
        return {subset: dict(counter) for subset, counter in freq.items()}

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's ss_dataset_dirs: per subset folder, repeats and image count."""
        dirs: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = dirs.setdefault(item.subset, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return dirs


def scan(cfg: TrainConfig) -> Dataset:
    """Find images and captions in train_data_dir (and reg_data_dir); raise one error listing every problem."""
    return from_reading(reader.read(cfg), cfg)


def from_reading(reading: reader.Reading, cfg: TrainConfig) -> Dataset:
    """The training items of a reading, bucketed; DatasetError listing every problem when training cannot use it."""
    problems = reading.problems(cfg)
    if problems:
        raise DatasetError("dataset problems:\n" + "\n".join(problem.text() for problem in problems))
    return build(reading.entries, cfg)


def build(entries: list[reader.Entry], cfg: TrainConfig) -> Dataset:
    """Training items (the trigger-word rule applied to their captions), bucketed, for the usable ``entries``."""
    items = []
    for entry in entries:
        if not entry.usable or entry.header is None:
            continue
        caption = caption_text.with_trigger(entry.caption or "", None if entry.is_reg else cfg.trigger_word)
        items.append(ImageItem(entry.path, caption, entry.repeats, entry.is_reg, entry.subset, entry.header.size,
                               mask_path=entry.mask_path))
    dataset = Dataset(items)
    assign_buckets(dataset, cfg)
    return dataset


def run_length(dataset: Dataset, cfg: TrainConfig, batch_size: int | None = None) -> tuple[int, int]:
    """(batches per epoch, optimizer steps of the run) as the trainer counts them; ``batch_size`` is what one step
    trains over all processes (default: the config's, one process)."""
    batches_per_epoch = len(epoch_batches(dataset, batch_size or cfg.batch_size, cfg.seed, 0))
    micro_total = cfg.epochs * batches_per_epoch
    return batches_per_epoch, cfg.max_train_steps or math.ceil(micro_total / cfg.gradient_accumulation_steps)


def make_buckets(max_area: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """Every (w, h) on the ``step`` grid within [min, max] with the largest area not above ``max_area``."""
    buckets = set()
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def assign_buckets(dataset: Dataset, cfg: TrainConfig) -> None:
    height, width = cfg.resolution_hw
    if cfg.enable_bucket:
        buckets = make_buckets(height * width, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
        buckets = buckets or [(width, height)]
    else:
        buckets = [(width, height)]
    for item in dataset.items:
        aspect = math.log(item.size[0] / item.size[1])
        item.bucket = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
    dataset.buckets = sorted({item.bucket for item in dataset.items})


def load_pixels(item: ImageItem) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB tensor in [-1, 1] at the item's bucket (cover-resize + centre crop) and the crop's top-left; the image
    as shown (EXIF rotation applied), transparency on white (``images.to_training_rgb``)."""
    with Image.open(item.path) as image:
        image = images.to_training_rgb(image)
    cropped, crop = fit_to_bucket(image, item.bucket)
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), crop


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """The image cover-resized to the (width, height) bucket and centre-cropped, with the crop's (top, left):
    the one geometry an image and its loss mask share."""
    target_w, target_h = bucket
    scale = max(target_w / image.width, target_h / image.height)
    resized = image.resize(
        (max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))), Image.LANCZOS
    )
    left = (resized.width - target_w) // 2
    top = (resized.height - target_h) // 2
    return resized.crop((left, top, left + target_w, top + target_h)), (top, left)


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches as item indices: repeats expanded, one bucket per batch, order seeded by epoch.

    Deterministic in (seed, epoch), so a resumed run sees exactly the batches the first run would have.
    """
    rng = random.Random(seed * 100_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(dataset.items):
        by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


def process_caption(caption: str, cfg: TrainConfig, rng: random.Random) -> str:
    """Caption dropout and tag shuffling (the first ``keep_tokens`` tags stay in place), per step."""
    if cfg.caption_dropout_rate and rng.random() < cfg.caption_dropout_rate:
        return ""
    if not cfg.shuffle_caption:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    keep = max(cfg.keep_tokens, 1 if cfg.trigger_word else 0)
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)
