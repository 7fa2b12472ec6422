"""Hold out images for validation: kohya's ``validation_split`` over the same scan the trainer uses.

kohya (library/train_util.split_train_val) shuffles each image folder with ``validation_seed`` and keeps the
first part for training and the rest for validation. Its two cut points (``ceil`` for training, ``round`` for
validation) can put one image in both parts; here one cut point decides, so a held-out image is never trained
on. Regularization folders are never split (as kohya), and every folder keeps at least one training image.
"""

from __future__ import annotations

import dataclasses
import random

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data.dataset import Dataset, ImageItem


def split_for_run(dataset: Dataset, cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """(training set, held-out set) exactly as a run of ``cfg`` splits: ``validation_seed``, else ``seed``."""
    seed = cfg.validation_seed if cfg.validation_seed is not None else cfg.seed
    return split_validation(dataset, cfg.validation_split, seed)


def split_validation(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(training set, held-out set). Stable for a seed: the same folder and seed hold out the same files.

    Held-out items count once (kohya validates without repeats).
    """
    if fraction <= 0:
        return dataset, Dataset([])
    rng = random.Random(seed)
    train: list[ImageItem] = []
    held: list[ImageItem] = []
    for subset in dict.fromkeys((item.subset, item.is_reg) for item in dataset.items):
        items = [item for item in dataset.items if (item.subset, item.is_reg) == subset]
        if subset[1]:
            train += items
            continue
        order = sorted(items, key=lambda item: str(item.path))
        rng.shuffle(order)
        count = min(round(len(order) * fraction), len(order) - 1)
        cut = len(order) - count
        chosen = {id(item) for item in order[cut:]}
        train += [item for item in items if id(item) not in chosen]
        held += [dataclasses.replace(item, repeats=1) for item in items if id(item) in chosen]
    return _with_buckets(train), _with_buckets(held)


def _with_buckets(items: list[ImageItem]) -> Dataset:
    return Dataset(items, sorted({item.bucket for item in items}))
