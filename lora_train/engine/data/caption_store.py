"""Where captions are kept: reading and writing both stores, and the rows behind the WebUI's caption grid.

Two stores, both read by the trainer: a ``metadata.csv`` (``filename,prompt``) in the image folder, or one
``.txt`` sidecar next to each image (kohya style). Every write is atomic so an edit or a crash never leaves a
half-written caption file. Nothing here imports gradio or the WebUI: the tab calls these plain functions.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_train.engine.files import atomic_write_bytes, atomic_write_text

# The one list the captioner, the tab, uploads and the trainer share: all of them open images with Pillow.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAME = "metadata.csv"
CSV_HEADER = ("filename", "prompt")
# Header spellings accepted on read (HF imagefolder uses file_name,text; some tools use caption).
_NAME_COLUMNS = ("filename", "file_name", "file", "image")
_CAPTION_COLUMNS = ("prompt", "text", "caption", "tags")

Mode = Literal["csv", "sidecar"]


class CaptionFileError(ValueError):
    """A caption file exists but cannot be used; the message names the file and what to fix."""


@dataclass
class CaptionRow:
    """One line of the caption table.

    ``name`` is the image path relative to the folder, with ``/`` separators (the CSV key);
    ``caption`` is None when the image has no caption yet (an empty caption counts as none).
    """

    image: Path
    name: str
    caption: str | None

    @property
    def missing(self) -> bool:
        return not self.caption


# ---------------------------------------------------------------------------------------------- images


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted by relative path), skipping hidden files such as ``.x.png.tmp``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder not found: {folder}")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = [
        p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    ]
    return sorted(images, key=lambda p: relative_name(folder, p))


def relative_name(folder: str | Path, image: str | Path) -> str:
    """The key an image has in ``metadata.csv``: its path relative to the folder, ``/``-separated."""
    return Path(image).relative_to(Path(folder)).as_posix()


# ---------------------------------------------------------------------------------------------- csv


def csv_text(captions: Mapping[str, str]) -> str:
    """Render ``filename,prompt`` rows; csv quoting keeps commas, quotes and newlines intact."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for name, caption in captions.items():
        writer.writerow((name, caption))
    return buffer.getvalue()


def read_metadata_csv(path: str | Path) -> dict[str, str]:
    """Read a caption CSV into ``{filename: caption}`` (missing file -> empty dict).

    Accepts the usual header spellings and a UTF-8 BOM (spreadsheet exports); raises CaptionFileError
    naming the file when the header has no file-name or caption column.
    """
    path = Path(path)
    if not path.exists():
        return {}
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader, None)
    if header is None:
        return {}
    lowered = [h.strip().lower() for h in header]
    name_col = _find_column(lowered, _NAME_COLUMNS)
    caption_col = _find_column(lowered, _CAPTION_COLUMNS)
    if name_col is None or caption_col is None:
        raise CaptionFileError(
            f"{path}: header {header!r} needs a file-name column ({'/'.join(_NAME_COLUMNS)}) and a "
            f"caption column ({'/'.join(_CAPTION_COLUMNS)}); expected 'filename,prompt'."
        )
    captions: dict[str, str] = {}
    try:
        for row in reader:
            if len(row) <= name_col or not row[name_col].strip():
                continue
            captions[row[name_col].strip()] = row[caption_col] if len(row) > caption_col else ""
    except csv.Error as exc:
        raise CaptionFileError(f"{path}: not a readable CSV ({exc}); save it as CSV with a filename,prompt header"
                               ) from None
    return captions


def write_metadata_csv(path: str | Path, captions: Mapping[str, str]) -> Path:
    """Atomically write ``captions`` as ``filename,prompt`` CSV (UTF-8, ``\\n`` line ends).

    Written as bytes so that newlines inside quoted captions are not translated on Windows.
    """
    return atomic_write_bytes(path, csv_text(captions).encode("utf-8"))


def _find_column(header: list[str], names: Iterable[str]) -> int | None:
    for name in names:
        if name in header:
            return header.index(name)
    return None


# ---------------------------------------------------------------------------------------------- sidecars


def read_text(path: str | Path) -> str:
    """A caption or prompt file as text: UTF-8 (a BOM is dropped); anything else names the file and the fix."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionFileError(
            f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position {exc.start}); "
            "re-save it as UTF-8 in your editor"
        ) from None


def sidecar_path(image: str | Path, extension: str = ".txt") -> Path:
    """``photo.png`` -> ``photo.txt`` (kohya's caption extension)."""
    return Path(image).with_suffix(extension)


def read_sidecar(image: str | Path, extension: str = ".txt") -> str | None:
    """The sidecar caption of ``image`` (surrounding whitespace stripped), or None when there is none."""
    path = sidecar_path(image, extension)
    if not path.is_file():
        return None
    return read_text(path).strip()


def write_sidecar(image: str | Path, caption: str) -> Path:
    """Atomically write the sidecar caption of ``image``."""
    return atomic_write_text(sidecar_path(image), caption.strip() + "\n")


# ---------------------------------------------------------------------------------------------- stores


def detect_mode(folder: str | Path, csv_path: str | Path | None = None) -> Mode:
    """``csv`` when the folder has a caption CSV (or one is named), else ``sidecar``."""
    if csv_path is not None or (Path(folder) / METADATA_NAME).exists():
        return "csv"
    return "sidecar"


def default_csv_path(folder: str | Path, csv_path: str | Path | None = None) -> Path:
    return Path(csv_path) if csv_path is not None else Path(folder) / METADATA_NAME


def load_captions(
    folder: str | Path,
    images: Iterable[Path],
    mode: Mode | None = None,
    csv_path: str | Path | None = None,
) -> dict[str, str | None]:
    """``{relative name: caption or None}`` for ``images`` from the chosen store."""
    mode = mode or detect_mode(folder, csv_path)
    if mode == "csv":
        table = read_metadata_csv(default_csv_path(folder, csv_path))
        return {relative_name(folder, p): table.get(relative_name(folder, p)) for p in images}
    return {relative_name(folder, p): read_sidecar(p) for p in images}


def list_rows(
    folder: str | Path,
    mode: Mode | None = None,
    csv_path: str | Path | None = None,
    recursive: bool = False,
) -> list[CaptionRow]:
    """The caption table: one row per image (path, file name, caption or None).

    ``mode`` None picks ``csv`` when ``metadata.csv`` exists, else ``sidecar``. An empty caption is
    reported as None so the grid can flag it.
    """
    images = list_images(folder, recursive=recursive)
    captions = load_captions(folder, images, mode, csv_path)
    rows = []
    for image in images:
        name = relative_name(folder, image)
        caption = captions.get(name)
        rows.append(CaptionRow(image=image, name=name, caption=caption if caption else None))
    return rows


def missing_captions(rows: Iterable[CaptionRow]) -> list[str]:
    """Names of caption-less images (flag them in the grid or before training)."""
    return [row.name for row in rows if row.missing]


def save_captions(
    folder: str | Path,
    edits: Mapping[str, str],
    mode: Mode | None = None,
    csv_path: str | Path | None = None,
) -> list[Path]:
    """Save edited captions (``{relative name: caption}``) back to the store; returns the files written.

    CSV: rows not in ``edits`` are kept, the whole file is replaced in one atomic write. Sidecar: each
    edited caption is written atomically next to its image. Names must refer to files inside ``folder``.
    """
    folder = Path(folder)
    mode = mode or detect_mode(folder, csv_path)
    for name in edits:
        _check_inside(folder, name)
    if not edits:
        return []
    if mode == "csv":
        path = default_csv_path(folder, csv_path)
        table = read_metadata_csv(path)
        table.update({name: caption.strip() for name, caption in edits.items()})
        return [write_metadata_csv(path, table)]
    return [write_sidecar(folder / name, caption) for name, caption in edits.items()]


def _check_inside(folder: Path, name: str) -> None:
    resolved = (folder / name).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise CaptionFileError(f"{name!r} is outside the image folder {folder}")
