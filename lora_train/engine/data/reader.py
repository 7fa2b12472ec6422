"""What training finds in a dataset folder: every image file it would read, with its header, its repeats and its
caption as stored, and every problem that stops a run.

One reader: ``dataset.scan`` turns a reading into training items (or one error listing every problem), and the
dataset doctor judges the same reading, so what the doctor says is exactly what training will do. The folder
rules are kohya's: images in the folder count once, images in ``N_name`` subfolders N times; captions come from
``.txt`` sidecars (``caption_extension``) or a ``metadata.csv``; a reg folder follows the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import caption_store, images
from lora_train.engine.data.images import ImageHeader

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
CAPTION_HINT = "(write captions, or run `python -m lora_train caption --input <folder>`)"


class DatasetError(ValueError):
    """A dataset training cannot use; the message lists every problem at once."""


@dataclass
class Entry:
    """One image file training would read. ``header`` is None when Pillow cannot open it (``error`` says why);
    ``caption`` is the caption as stored (None: there is none), before the trigger-word rule."""

    path: Path
    root: Path  # train_data_dir or reg_data_dir
    folder: Path  # the root itself or its N_name subfolder
    repeats: int
    is_reg: bool
    header: ImageHeader | None = None
    error: str | None = None
    caption: str | None = None
    caption_error: str | None = None  # the caption file exists but is not UTF-8
    caption_key: str | None = None  # the metadata.csv row it came from (None: a sidecar file)
    mask_path: Path | None = None  # its loss mask in conditioning_data_dir (masked_loss)

    @property
    def subset(self) -> str:
        return self.folder.name

    @property
    def usable(self) -> bool:
        """Training reads it: a readable image with a caption (reg images may go without)."""
        return self.header is not None and self.caption_error is None and (self.is_reg or self.caption is not None)


@dataclass
class Problem:
    """Something that stops training: ``code`` for programs, ``message`` for people, the image files concerned
    with a note each where there is more to say, and a last line saying what to do where the message does not."""

    code: str
    message: str
    files: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    hint: str = ""

    def text(self) -> str:
        """The message and its files, one per line (as the training error lists them)."""
        lines = [f"{f} ({self.notes[f]})" if f in self.notes else f for f in self.files]
        return "\n  ".join([self.message, *lines, *([self.hint] if self.hint else [])])


@dataclass
class Reading:
    """Everything found in the dataset folders, in training order."""

    entries: list[Entry]
    metadata_path: Path | None
    unused_rows: list[str]  # metadata.csv rows naming no image in the folders
    ignored: list[Path]  # files in the image folders that are not images training reads
    skipped_folders: list[Path] = field(default_factory=list)  # subfolders that are not N_name (kohya skips them)
    mask_problems: list[str] = field(default_factory=list)  # conditioning_data_dir's (masked_loss)

    def problems(self, cfg: TrainConfig) -> list[Problem]:
        """What stops training, with the sentences the training error and the doctor both show."""
        problems = [Problem("mask-problem", text) for text in self.mask_problems]
        unreadable = [e for e in self.entries if e.header is None]
        if unreadable:
            problems.append(Problem("image-unreadable", f"{len(unreadable)} unreadable image(s):",
                                    [str(e.path) for e in unreadable], {str(e.path): str(e.error) for e in unreadable},
                                    "(re-save them with an image editor, or move them out of the folder)"))
        undecodable = [e for e in self.entries if e.caption_error and e.header is not None]
        if undecodable:
            problems.append(Problem("caption-not-utf8", f"{len(undecodable)} caption file(s) are not UTF-8 text:",
                                    [str(e.path) for e in undecodable],
                                    {str(e.path): str(e.caption_error) for e in undecodable},
                                    "(re-save them as UTF-8 in your editor)"))
        if self.unused_rows:
            unused = self.unused_rows
            problems.append(Problem(
                "metadata-rows-unused",
                f"{cfg.metadata_path} names {len(unused)} image(s) that are not in the training folders: "
                f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''} (fix the names, or remove those rows)"))
        uncaptioned = [e for e in self.entries if e.header is not None and e.caption is None and not e.is_reg
                       and e.caption_error is None]
        if uncaptioned:
            source = cfg.metadata_path or f"'{cfg.caption_extension}' files next to the images"
            problems.append(Problem("caption-missing", f"{len(uncaptioned)} image(s) without a caption in {source}:",
                                    [str(e.path) for e in uncaptioned], hint=CAPTION_HINT))
        return problems


def read(cfg: TrainConfig) -> Reading:
    """Read ``train_data_dir`` (and ``reg_data_dir``) as training will. Raises DatasetError only when there is no
    dataset to speak of (a missing folder, no images, an unreadable metadata CSV); everything else is recorded."""
    roots = [(Path(cfg.train_data_dir), False)]
    if cfg.reg_data_dir:
        roots.append((Path(cfg.reg_data_dir), True))
    metadata = _read_metadata(Path(cfg.metadata_path)) if cfg.metadata_path else None
    captions = _Captions(metadata, cfg.caption_extension)
    masks = _MaskFiles(Path(cfg.conditioning_data_dir)) if cfg.conditioning_data_dir else None
    entries: list[Entry] = []
    ignored: list[Path] = []
    skipped: list[Path] = []
    for root, is_reg in roots:
        key = "reg_data_dir" if is_reg else "train_data_dir"
        if not str(root) or not root.is_dir():
            raise DatasetError(f"{key} {str(root)!r} is not a folder")
        subsets = _subsets(root)
        skipped += [p for p in sorted(root.iterdir()) if p.is_dir() and not _REPEAT_FOLDER.match(p.name)
                    and not p.name.startswith((".", "_"))]
        if not subsets:
            kinds = ", ".join(sorted(caption_store.IMAGE_EXTENSIONS))
            raise DatasetError(f"{key} {root}: no images ({kinds}) in it or in N_name subfolders")
        for folder, repeats in subsets:
            ignored += _ignored_files(folder, cfg.caption_extension)
            for path in caption_store.list_images(folder):
                entry = Entry(path, root, folder, repeats, is_reg)
                try:
                    entry.header = images.read_header(path)
                except Exception as exc:  # noqa: BLE001 - any decoder error means the same to the user
                    entry.error = "empty file" if _is_empty(path) else exc.__class__.__name__
                try:  # also for an unreadable image: its metadata row is not "unused", and a fix moves it along
                    entry.caption, entry.caption_key = captions.find(path, root)
                except caption_store.CaptionFileError as exc:
                    entry.caption_error = str(exc)
                if masks is not None and not is_reg and entry.header is not None:  # reg images train everywhere
                    entry.mask_path = masks.find(path, root, entry.header.size)
                entries.append(entry)
    metadata_path = Path(cfg.metadata_path) if cfg.metadata_path else None
    return Reading(entries, metadata_path, captions.unused(), ignored, skipped,
                   masks.problems() if masks is not None else [])


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _subsets(root: Path) -> list[tuple[Path, int]]:
    """(folder, repeats): the root's own images once, plus every ``N_name`` subfolder N times."""
    subsets = [(root, 1)] if caption_store.list_images(root) else []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _REPEAT_FOLDER.match(child.name)
        if match:
            subsets.append((child, int(match.group(1))))
    return subsets


def _ignored_files(folder: Path, caption_extension: str) -> list[Path]:
    """Files in an image folder that training skips: not an image type it reads, not a caption, not hidden."""
    known = {*caption_store.IMAGE_EXTENSIONS, caption_extension.lower(), ".txt", ".csv", ".json", ".yaml", ".yml",
             ".npz", ".md"}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in known)


def _read_metadata(path: Path) -> dict[str, str]:
    """The captioner's ``filename,prompt`` CSV, read by the same code that writes it."""
    if not path.is_file():
        raise DatasetError(f"metadata_path {str(path)!r} is not a file")
    try:
        return {name: caption.strip() for name, caption in caption_store.read_metadata_csv(path).items()}
    except caption_store.CaptionFileError as exc:
        raise DatasetError(str(exc)) from None


class _Captions:
    """Captions from metadata.csv or sidecar files, remembering which CSV rows matched an image."""

    def __init__(self, metadata: dict[str, str] | None, extension: str):
        self.metadata = metadata
        self.extension = extension
        self.used: set[str] = set()

    def find(self, path: Path, root: Path) -> tuple[str | None, str | None]:
        """(stored caption (stripped) or None, the metadata.csv key it came from); CaptionFileError for a
        non-UTF-8 sidecar."""
        if self.metadata is not None:
            for name in (path.relative_to(root).as_posix(), path.name):
                if name in self.metadata:
                    self.used.add(name)
                    return self.metadata[name], name
            return None, None
        return caption_store.read_sidecar(path, self.extension), None

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
                    mask_size = images.read_header(mask).size
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
