"""Loss masks for masked_loss, as kohya reads them: an image's alpha channel (alpha_mask) or the red channel of
its mask image in conditioning_data_dir, 1 where the image trains and 0 where it does not.

A mask goes through the image's own geometry (dataset.fit_to_bucket) and is then area-averaged down to the
latents' size, as kohya's apply_masked_loss does, once per image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data.dataset import Dataset, ImageItem, fit_to_bucket


def uses_masks(cfg: TrainConfig) -> bool:
    """Whether the run trains with a loss mask (kohya: alpha_mask turns it on by itself)."""
    return cfg.alpha_mask or bool(cfg.masked_loss and cfg.conditioning_data_dir)


def _mask_image(item: ImageItem) -> Image.Image:
    """The mask as a greyscale image at the image's (EXIF-rotated) size: 255 trains, 0 does not."""
    if item.mask_path is not None:
        with Image.open(item.mask_path) as mask:
            return ImageOps.exif_transpose(mask).convert("RGB").getchannel("R")
    with Image.open(item.path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            return image.convert("RGBA").getchannel("A")
        return Image.new("L", image.size, 255)  # no alpha: the whole image trains


def load_mask(item: ImageItem) -> torch.Tensor:
    """The item's mask at its bucket, [height, width] in [0, 1]."""
    fitted, _ = fit_to_bucket(_mask_image(item), item.bucket)
    return torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)


class MaskCache:
    """Each item's mask at the latents' size, made on first use and kept on the device (a mask is small)."""

    def __init__(self, dataset: Dataset, device: torch.device):
        self.dataset, self.device = dataset, device
        self.cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def batch(self, indices: list[int], size: tuple[int, int]) -> torch.Tensor:
        """Masks of a batch, [batch, 1, height, width] at the latents' ``size``."""
        masks = []
        for index in indices:
            key = (index, *size)
            if key not in self.cache:
                pixels = load_mask(self.dataset.items[index])[None, None]
                self.cache[key] = F.interpolate(pixels, size=size, mode="area")[0].to(self.device)
            masks.append(self.cache[key])
        return torch.stack(masks)
