"""Turn uploaded images, captions and zips into a new dataset folder, safely.

Uploads come from a browser that may be on another machine, so a zip is untrusted: no entry may escape the
target folder (absolute names, ``..``, drive letters, symlinks), only image and caption files are extracted, and
the number of files and their real (decompressed) size are capped. Every refusal is an ``UploadError`` whose
message says which file and which limit.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lora_train.engine.data.caption_store import IMAGE_EXTENSIONS

CAPTION_EXTENSIONS = frozenset({".txt", ".caption", ".csv"})
ALLOWED_EXTENSIONS = IMAGE_EXTENSIONS | CAPTION_EXTENSIONS
_CHUNK = 1 << 20


class UploadError(ValueError):
    """An upload that cannot be accepted; the message names the file and the rule."""


@dataclass(frozen=True)
class Limits:
    max_files: int = 5000
    max_file_bytes: int = 64 << 20
    max_total_bytes: int = 2 << 30


@dataclass
class UploadReport:
    folder: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.written)} file(s) into {self.folder}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} (not an image or caption): {', '.join(self.skipped[:5])}"
        return text


def _safe_relative(name: str) -> PurePosixPath | None:
    """A zip entry name as a relative path inside the target, or None when it would escape it."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return PurePosixPath(*parts)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


class _Budget:
    """Counts files and bytes across one upload so several zips together stay within the limits."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.files = 0
        self.bytes = 0

    def add_file(self, label: str) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise UploadError(f"{label}: more than {self.limits.max_files} files in one upload; split it up")

    def add_bytes(self, label: str, count: int, file_bytes: int) -> None:
        self.bytes += count
        if file_bytes > self.limits.max_file_bytes:
            raise UploadError(f"{label}: larger than {self.limits.max_file_bytes >> 20} MiB per file")
        if self.bytes > self.limits.max_total_bytes:
            raise UploadError(f"{label}: upload exceeds {self.limits.max_total_bytes >> 20} MiB in total")


def _copy_stream(source, target: Path, label: str, budget: _Budget) -> None:
    """Copy in chunks, counting real bytes (a zip header may lie about sizes)."""
    written = 0
    with open(target, "xb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            budget.add_bytes(label, len(chunk), written)
            out.write(chunk)


def _extract_zip(archive: Path, folder: Path, report: UploadReport, budget: _Budget) -> None:
    try:
        handle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise UploadError(f"{archive.name}: not a readable zip file") from None
    with handle:
        for info in handle.infolist():
            if info.is_dir():
                continue
            label = f"{archive.name}:{info.filename}"
            relative = _safe_relative(info.filename)
            if relative is None or _is_symlink(info):
                raise UploadError(f"{label}: entry would be written outside the dataset folder; refusing the zip")
            if relative.suffix.lower() not in ALLOWED_EXTENSIONS or relative.name.startswith("."):
                report.skipped.append(label)
                continue
            if relative.parts[0] == "__MACOSX":
                continue
            budget.add_file(label)
            if info.file_size > budget.limits.max_file_bytes:
                raise UploadError(f"{label}: larger than {budget.limits.max_file_bytes >> 20} MiB per file")
            target = folder.joinpath(*relative.parts)
            if not target.resolve().is_relative_to(folder.resolve()):
                raise UploadError(f"{label}: entry would be written outside the dataset folder; refusing the zip")
            target.parent.mkdir(parents=True, exist_ok=True)
            with handle.open(info) as source:
                try:
                    _copy_stream(source, target, label, budget)
                except FileExistsError:
                    raise UploadError(f"{label}: the zip holds this name twice") from None
                except (zipfile.BadZipFile, EOFError, OSError) as exc:
                    raise UploadError(f"{label}: corrupt zip entry ({exc})") from None
            report.written.append(relative.as_posix())


def import_upload(files: Iterable[str | Path], folder: str | Path, limits: Limits = Limits()) -> UploadReport:
    """Copy uploaded images/captions and extract zips into ``folder`` (a new, empty folder).

    On any refusal the partly filled folder is removed, so a bad upload leaves nothing behind.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UploadError(f"{folder} already has files; uploads go into a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    report = UploadReport(folder)
    budget = _Budget(limits)
    try:
        for item in files:
            path = Path(item)
            name = _upload_name(path)
            if path.suffix.lower() == ".zip":
                _extract_zip(path, folder, report, budget)
            elif Path(name).suffix.lower() in ALLOWED_EXTENSIONS:
                budget.add_file(name)
                with open(path, "rb") as source:
                    try:
                        _copy_stream(source, folder / name, name, budget)
                    except FileExistsError:
                        raise UploadError(f"{name}: uploaded twice") from None
                report.written.append(name)
            else:
                report.skipped.append(name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if not any(Path(n).suffix.lower() in IMAGE_EXTENSIONS for n in report.written):
        shutil.rmtree(folder, ignore_errors=True)
        raise UploadError("the upload holds no images (.png, .jpg, .webp, ...)")
    return report


def _upload_name(path: Path) -> str:
    """The file's own name, stripped of any folder part a browser sent."""
    name = Path(str(path).replace("\\", "/")).name
    if not name or name in (".", "..") or name.startswith("."):
        raise UploadError(f"{str(path)!r} is not an acceptable file name")
    return name
