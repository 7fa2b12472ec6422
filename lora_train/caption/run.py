"""Run any captioner over an image folder and write through the engine's caption store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from lora_train.caption.options import CaptionOptions
from lora_train.engine.data import caption_store


class ImageCaptioner(Protocol):
    """What caption_images needs: finished caption lines for a batch of RGB images, and a way to free memory."""

    def describe(self, images: Sequence[Image.Image], options: CaptionOptions | None = None) -> list[str]: ...

    def unload(self) -> None: ...


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
    captioner: ImageCaptioner,
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
    folder: Path, batch: list[Path], captioner: ImageCaptioner, options: CaptionOptions, report: CaptionReport
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



def preview_captions(
    folder: str | Path, captioner: ImageCaptioner, options: CaptionOptions | None = None, count: int = 4
) -> dict[str, str]:
    """Captions for the first ``count`` images, nothing written: what "Caption images" would write, seen first."""
    folder = Path(folder)
    images = caption_store.list_images(folder)[: max(0, count)]
    return _caption_batch(folder, images, captioner, options or CaptionOptions(), CaptionReport())
