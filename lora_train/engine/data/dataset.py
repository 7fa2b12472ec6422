"""Training images: folder scan, captions, kohya's ``N_name`` repeats, aspect-ratio buckets, batches.

Every problem in a dataset (unreadable file, missing caption) is collected and reported in one error, so a
user fixes the folder once instead of once per image.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import caption_store, caption_text

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """One report of every bad image in a dataset."""


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


def _subsets(root: Path) -> list[tuple[Path, int]]:
    """(folder, repeats): the root's own images once, plus every ``N_name`` subfolder N times."""
    subsets = [(root, 1)] if caption_store.list_images(root) else []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _REPEAT_FOLDER.match(child.name)
        if match:
            subsets.append((child, int(match.group(1))))
    return subsets


def _read_metadata(path: Path) -> dict[str, str]:
    """The captioner's ``filename,prompt`` CSV, read by the same code that writes it."""
    if not path.is_file():
        raise DatasetError(f"metadata_path {str(path)!r} is not a file")
    try:
        return {name: caption.strip() for name, caption in caption_store.read_metadata_csv(path).items()}
    except caption_store.CaptionFileError as exc:
        raise DatasetError(str(exc)) from None


def _image_size(path: Path) -> tuple[int, int]:
    """Size after EXIF rotation, read from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def scan(cfg: TrainConfig) -> Dataset:
    """Find images and captions in train_data_dir (and reg_data_dir); raise one error listing every problem."""
    roots = [(Path(cfg.train_data_dir), False)]
    if cfg.reg_data_dir:
        roots.append((Path(cfg.reg_data_dir), True))
    metadata = _read_metadata(Path(cfg.metadata_path)) if cfg.metadata_path else None
    captions = _Captions(metadata, cfg.caption_extension)
    masks = _MaskFiles(Path(cfg.conditioning_data_dir)) if cfg.conditioning_data_dir else None
    items: list[ImageItem] = []
    unreadable: list[str] = []
    uncaptioned: list[str] = []
    for root, is_reg in roots:
        key = "reg_data_dir" if is_reg else "train_data_dir"
        if not str(root) or not root.is_dir():
            raise DatasetError(f"{key} {str(root)!r} is not a folder")
        subsets = _subsets(root)
        if not subsets:
            kinds = ", ".join(sorted(caption_store.IMAGE_EXTENSIONS))
            raise DatasetError(f"{key} {root}: no images ({kinds}) in it or in N_name subfolders")
        for folder, repeats in subsets:
            for path in caption_store.list_images(folder):
                try:
                    size = _image_size(path)
                except Exception as exc:  # noqa: BLE001 - any decoder error means the same to the user
                    unreadable.append(f"{path} ({exc.__class__.__name__})")
                    continue
                caption = captions.find(path, root)
                if caption is None and not is_reg:
                    uncaptioned.append(str(path))
                    continue
                caption = caption_text.with_trigger(caption or "", None if is_reg else cfg.trigger_word)
                items.append(ImageItem(path, caption, repeats, is_reg, folder.name, size))
                if masks is not None and not is_reg:  # regularization images train everywhere
                    items[-1].mask_path = masks.find(path, root, size)
    problems = [] if masks is None else masks.problems()
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable image(s):\n  " + "\n  ".join(unreadable))
    if captions.undecodable:
        problems.append("\n".join(captions.undecodable))
    if metadata is not None and captions.unused():
        unused = captions.unused()
        problems.append(
            f"{cfg.metadata_path} names {len(unused)} image(s) that are not in the training folders: "
            f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''} (fix the names, or remove those rows)"
        )
    if uncaptioned:
        source = cfg.metadata_path or f"'{cfg.caption_extension}' files next to the images"
        problems.append(
            f"{len(uncaptioned)} image(s) without a caption in {source}:\n  " + "\n  ".join(uncaptioned)
            + "\n  (write captions, or run `python -m lora_train caption --input <folder>`)"
        )
    if problems:
        raise DatasetError("dataset problems:\n" + "\n".join(problems))
    dataset = Dataset(items)
    assign_buckets(dataset, cfg)
    return dataset


class _Captions:
    """Captions from metadata.csv or sidecar files, remembering which CSV rows matched an image and which
    caption files could not be decoded (both reported with the other dataset problems)."""

    def __init__(self, metadata: dict[str, str] | None, extension: str):
        self.metadata = metadata
        self.extension = extension
        self.used: set[str] = set()
        self.undecodable: list[str] = []

    def find(self, path: Path, root: Path) -> str | None:
        if self.metadata is not None:
            for name in (path.relative_to(root).as_posix(), path.name):
                if name in self.metadata:
                    self.used.add(name)
                    return self.metadata[name]
            return None
        try:
            return caption_store.read_sidecar(path, self.extension)
        except caption_store.CaptionFileError as exc:
            self.undecodable.append(str(exc))
            return ""  # reported above; not also listed as missing

    def unused(self) -> list[str]:
        return sorted(set(self.metadata or {}) - self.used)


class _MaskFiles:
    """kohya's masked-loss images in conditioning_data_dir: one per training image with its name (any image type),
    in the same ``N_name`` subfolder or all in the folder itself, and of the image's size. Missing, unused and
    mis-sized masks are collected for the one dataset report."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}
        if folder.is_dir():
            for sub in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
                for path in caption_store.list_images(sub):
                    self.files[path.relative_to(folder).with_suffix("").as_posix()] = path
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mis_sized: list[str] = []

    def find(self, image: Path, root: Path, size: tuple[int, int]) -> Path | None:
        for key in (image.relative_to(root).with_suffix("").as_posix(), image.stem):
            if key in self.files:
                self.used.add(key)
                mask = self.files[key]
                try:
                    mask_size = _image_size(mask)
                except Exception as exc:  # noqa: BLE001 - any decoder error means the same to the user
                    self.mis_sized.append(f"{mask} is unreadable ({exc.__class__.__name__})")
                    return None
                if mask_size != size:
                    self.mis_sized.append(f"{mask} is {mask_size[0]}x{mask_size[1]}, {image.name} is "
                                          f"{size[0]}x{size[1]}")
                return mask
        self.missing.append(str(image))
        return None

    def problems(self) -> list[str]:
        if not self.folder.is_dir():
            return [f"conditioning_data_dir {str(self.folder)!r} is not a folder"]
        found = []
        if self.missing:
            found.append(f"{len(self.missing)} image(s) without a mask in {self.folder} (same name, any image type):"
                         "\n  " + "\n  ".join(self.missing))
        if self.mis_sized:
            found.append("mask images must have their image's size:\n  " + "\n  ".join(self.mis_sized))
        unused = sorted(set(self.files) - self.used)
        if unused:
            found.append(f"{len(unused)} mask(s) in {self.folder} match no training image: "
                         f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''} (rename or remove them)")
        return found


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
    """RGB tensor in [-1, 1] at the item's bucket (cover-resize + centre crop) and the crop's top-left."""
    with Image.open(item.path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
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
