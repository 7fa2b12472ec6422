"""The doctor's fixes, which lose nothing: files are moved aside (never deleted), captions are rewritten in place
with one atomic write each.

- ``move_aside``: an image and its caption go into an ``_excluded`` subfolder beside it (training skips folders
  that are not ``N_name``); a ``metadata.csv`` row goes into ``_excluded/metadata.csv`` with it. Names are never
  reused: a second ``a.png`` becomes ``a-2.png``.
- ``trigger_first``: the trigger word becomes the first tag of each caption file (the trainer's own rule).
- ``drop_repeated_tags``: the first of each repeated tag stays.

Only images the dataset reader finds can be touched, so a request cannot move or rewrite anything else. Writing
missing captions is the captioners' job (``lora_train.caption``); the tab and the CLI call them for that fix.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import caption_store, caption_text, reader
from lora_train.engine.data.doctor.findings import Report
from lora_train.engine.data.reader import Entry
from lora_train.engine.files import atomic_write_text, free_name

EXCLUDED = "_excluded"


class FixError(ValueError):
    """A fix that cannot run; the message names the file and why."""


@dataclass
class FixResult:
    moved: list[tuple[str, str]] = field(default_factory=list)  # (from, to), images and captions
    rewritten: list[str] = field(default_factory=list)  # caption files written

    def summary(self) -> str:
        images = [src for src, _ in self.moved if Path(src).suffix.lower() in caption_store.IMAGE_EXTENSIONS]
        parts = []
        if images:
            folders = sorted({str(Path(dst).parent) for _, dst in self.moved})
            parts.append(f"moved {len(images)} image(s) (with their captions) to {', '.join(folders)}")
        if self.rewritten:
            parts.append(f"rewrote {len(self.rewritten)} caption file(s)")
        return "; ".join(parts).capitalize() + "." if parts else "Nothing to change."


def apply(report: Report, cfg: TrainConfig, fix: str, trigger: str | None = None) -> FixResult:
    """Run ``fix`` ("exclude", "trigger" or "tags") on the files of every finding of ``report`` that offers it.
    The trigger fix writes ``trigger``, else the config's trigger word, else the one the doctor inferred."""
    findings = [f for f in report.findings if f.fix == fix]
    files = [file for finding in findings for file in finding.fix_targets]
    if fix == "exclude":
        return move_aside(cfg, files)
    if fix == "tags":
        return drop_repeated_tags(cfg, files)
    if fix == "trigger":
        inferred = next((f.data["trigger"] for f in findings if f.data.get("trigger")), None)
        word = (trigger or "").strip() or cfg.trigger_word or inferred
        return trigger_first(cfg, files, word or "") if files else FixResult()
    raise FixError(f"no fix {fix!r} here; the fixes are exclude, trigger and tags (captions: lora-train caption)")


def _entries(cfg: TrainConfig, files: Iterable[str | Path]) -> list[Entry]:
    """The reader's entries for ``files``; FixError for a file the dataset does not hold."""
    by_path = {e.path.resolve(): e for e in reader.read(cfg).entries}
    chosen = []
    for file in files:
        entry = by_path.get(Path(file).resolve())
        if entry is None:
            raise FixError(f"{file} is not an image of this dataset; nothing was changed")
        if entry not in chosen:
            chosen.append(entry)
    return chosen


def move_aside(cfg: TrainConfig, files: Iterable[str | Path]) -> FixResult:
    """Move each image, its sidecar caption and its metadata.csv row into ``_excluded`` beside it."""
    entries = _entries(cfg, files)
    result = FixResult()
    rows: dict[str, str] = {}  # metadata rows moved, by the image's new name
    for entry in entries:
        target = entry.path.parent / EXCLUDED
        sidecar = caption_store.sidecar_path(entry.path, cfg.caption_extension)
        suffixes = (entry.path.suffix, sidecar.suffix)
        stem = free_name(target, entry.path.stem, suffixes)
        target.mkdir(exist_ok=True)
        if sidecar.is_file() and entry.caption_key is None:
            result.moved.append((str(sidecar), str(_move(sidecar, target / f"{stem}{sidecar.suffix}"))))
        moved = _move(entry.path, target / f"{stem}{entry.path.suffix}")
        result.moved.append((str(entry.path), str(moved)))
        if entry.caption_key is not None and entry.caption is not None:
            rows[moved.name] = entry.caption
    if rows and cfg.metadata_path:
        _move_rows(Path(cfg.metadata_path), {e.caption_key for e in entries if e.caption_key}, rows)
    return result


def _move(source: Path, target: Path) -> Path:
    if target.exists():  # free_name picked a free stem; a race with another writer must not overwrite
        raise FixError(f"{target} appeared while moving {source}; nothing more was moved")
    shutil.move(str(source), str(target))
    return target


def _move_rows(csv_path: Path, keys: set[str | None], rows: dict[str, str]) -> None:
    """Write the rows into ``_excluded/<csv name>`` first, then drop them from the CSV: a crash in between leaves
    a row twice, never nowhere."""
    excluded = csv_path.parent / EXCLUDED / csv_path.name
    kept = caption_store.read_metadata_csv(excluded)
    kept.update(rows)
    caption_store.write_metadata_csv(excluded, kept)
    table = caption_store.read_metadata_csv(csv_path)
    caption_store.write_metadata_csv(csv_path, {k: v for k, v in table.items() if k not in keys})


def trigger_first(cfg: TrainConfig, files: Iterable[str | Path], trigger: str) -> FixResult:
    """Make ``trigger`` the first tag of each image's non-empty caption (kept once; nothing else changes)."""
    trigger = trigger.strip()
    if not trigger:
        raise FixError("no trigger word: set trigger_word first")
    # an empty caption stays empty: the trigger alone would hide it from the missing-caption fix
    return _rewrite(cfg, files, lambda caption: caption_text.with_trigger(caption, trigger) if caption else caption)


def drop_repeated_tags(cfg: TrainConfig, files: Iterable[str | Path]) -> FixResult:
    """Keep the first of each tag said twice (compared ignoring case)."""

    def unique(caption: str) -> str:
        seen: set[str] = set()
        tags = []
        for tag in caption_text.split_tags(caption):
            if tag.lower() not in seen:
                seen.add(tag.lower())
                tags.append(tag)
        return ", ".join(tags)

    return _rewrite(cfg, files, unique)


def _rewrite(cfg: TrainConfig, files: Iterable[str | Path], change: Callable[[str], str]) -> FixResult:
    """Apply ``change`` to each image's stored caption; the CSV in one atomic write, sidecars one each."""
    result = FixResult()
    edits: dict[str, str] = {}
    for entry in _entries(cfg, files):
        if entry.caption is None:
            continue  # no caption to change: the missing-caption fix writes one
        new = change(entry.caption)
        if new == entry.caption:
            continue
        if entry.caption_key is not None:
            edits[entry.caption_key] = new
        else:
            sidecar = caption_store.sidecar_path(entry.path, cfg.caption_extension)
            result.rewritten.append(str(atomic_write_text(sidecar, new + "\n")))
    if edits and cfg.metadata_path:
        table = caption_store.read_metadata_csv(cfg.metadata_path)
        table.update(edits)
        result.rewritten.append(str(caption_store.write_metadata_csv(cfg.metadata_path, table)))
    return result
