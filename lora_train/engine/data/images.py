"""How training reads an image file: its header (the size the user sees, after EXIF rotation) and its pixels as
the 8-bit RGB the model is trained on.

The dataset scan, the training loader and the dataset doctor all go through these two functions, so what the
doctor reports about an image (its size, its rotation, its transparency) is what training does with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
# Pillow modes whose pixels are more than 8 bits (16-bit PNG/TIFF grey opens as "I", float TIFF as "F"): a plain
# convert("RGB") clips them to 255, so a 16-bit grey photo would train as a white sheet.
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding its pixels."""

    width: int  # as shown: after the EXIF rotation
    height: int
    format: str | None  # Pillow's name of the content ("JPEG", "PNG", ...), whatever the extension says
    mode: str  # Pillow's pixel mode ("RGB", "RGBA", "P", "CMYK", "I" ...)
    orientation: int  # EXIF orientation 1-8 (1: as stored)
    may_have_alpha: bool  # an alpha channel or a transparent palette entry (the pixels may still be opaque)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def rotated(self) -> bool:
        return self.orientation not in (0, 1)


def read_header(path: str | Path) -> ImageHeader:
    """The header of ``path``; raises whatever Pillow raises for a file it cannot open."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = _orientation(image)
        alpha = image.mode in ALPHA_MODES or "transparency" in image.info
        header = ImageHeader(width, height, image.format, image.mode, orientation if isinstance(orientation, int)
                             else 1, alpha)
    if header.orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees: shown the other way round
        return ImageHeader(height, width, header.format, header.mode, header.orientation, header.may_have_alpha)
    return header


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation from the header. A PNG without an eXIf chunk before its pixels has none: Pillow's
    ``getexif`` would decode the whole image to look after them (seconds per hundred images)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(EXIF_ORIENTATION, 1)


def has_alpha(image: Image.Image) -> bool:
    """True when ``image`` (decoded) carries transparency information, by channel or by palette/colour key."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def to_training_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image training sees: EXIF rotation applied (the image as viewers show it), transparent
    pixels composited onto white, 16-bit and float grey scaled to 8 bits instead of clipped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_MODES:
        image = _to_8bit(image)
    if has_alpha(image):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit integer grey (0-65535) or float grey (0-1, else clipped to 0-255) as 8-bit "L".

    Pillow opens a 16-bit grey PNG as 32-bit "I"; an "I" image whose values all fit in 8 bits is taken as 8-bit.
    """
    array = np.asarray(image, dtype=np.float64)
    peak = array.max() if array.size else 0.0
    if image.mode == "F":
        scaled = array * 255.0 if peak <= 1.0 else array
    elif image.mode == "I" and peak <= 255:
        scaled = array
    else:
        scaled = array / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
