"""The tab's "Dataset check": the doctor's findings as a summary line, a table and thumbnails of the files
concerned, and one-click fixes that lose nothing.

It only renders ``engine.data.doctor``'s report (through ``webui.doctor``, the API's path too). ``ui.py`` runs it
on Load and on Train; the plain functions here do the work, so tests call them without a browser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lora_train.engine.config.settings import ConfigError
from lora_train.engine.data import caption_store
from lora_train.engine.data.doctor import Report
from lora_train.webui import doctor
from lora_train.webui.jobs import JobRunner
from lora_train.webui.ui_gradio import make

TABLE_HEADERS = ["severity", "finding", "what to do", "files"]
ICONS = {"error": "ERROR", "warning": "⚠️ warning", "info": "note"}
THUMBNAILS = 60  # files shown in the gallery, errors and warnings first
_NO_THUMBNAIL = {"image-unreadable", "image-truncated", "files-ignored", "folders-ignored"}


@dataclass
class DoctorPanel:
    """The widgets ``doctor_panel`` made."""

    summary: Any
    table: Any
    gallery: Any
    check_button: Any
    exclude_button: Any
    caption_button: Any
    trigger_button: Any
    tags_button: Any

    @property
    def outputs(self) -> list[Any]:
        """What a check updates: summary, table, gallery."""
        return [self.summary, self.table, self.gallery]


def doctor_summary() -> Any:
    """The one-line verdict under the dataset row (always in view)."""
    return make(gr.Markdown, value="", elem_id="lora_train_doctor_summary")


def doctor_panel(summary: Any) -> DoctorPanel:
    """The Dataset check tab's widgets (``summary`` is the line made by ``doctor_summary``)."""
    with gr.Row():
        check_button = make(gr.Button, value="Check dataset", elem_id="lora_train_doctor_check")
        exclude_button = make(gr.Button, value="Move flagged images to _excluded", elem_id="lora_train_doctor_exclude")
        caption_button = make(gr.Button, value="Write missing captions", elem_id="lora_train_doctor_caption")
        trigger_button = make(gr.Button, value="Put trigger word first", elem_id="lora_train_doctor_trigger")
        tags_button = make(gr.Button, value="Drop repeated tags", elem_id="lora_train_doctor_tags")
    make(gr.Markdown, value="Runs on Load and on Train: errors stop Train, warnings do not. Fixes never delete: "
         "images move into an `_excluded` subfolder with their captions; missing captions are written with the "
         "captioner chosen under Captions.", elem_id="lora_train_doctor_help")
    with gr.Row():
        with gr.Column(scale=3):
            table = make(gr.Dataframe, headers=TABLE_HEADERS, datatype=["str"] * 4, type="array", interactive=False,
                         wrap=True, label="Findings", elem_id="lora_train_doctor_table")
        with gr.Column(scale=2):
            gallery = make(gr.Gallery, label="Files concerned", columns=4, height=420, object_fit="contain",
                           elem_id="lora_train_doctor_gallery")
    return DoctorPanel(summary, table, gallery, check_button, exclude_button, caption_button, trigger_button,
                       tags_button)


# ---------------------------------------------------------------------------------------------- rendering


def summary_text(report: Report) -> str:
    """The verdict line: counts, and for errors the sentence that stops Train."""
    line = f"**{report.summary()[0].upper()}{report.summary()[1:]}**"
    if report.errors:
        return f"{line} — Train is blocked: {report.errors[0].message} (see Dataset check)"
    if report.of("warning"):
        return f"{line} — Train will run; see Dataset check for what will train badly."
    return f"{line} — no problems found."


def table_rows(report: Report) -> pd.DataFrame:
    rows = []
    for finding in sorted(report.findings, key=lambda f: ("error", "warning", "info").index(f.severity)):
        names = [Path(f).name for f in finding.files[:4]]
        more = f" +{len(finding.files) - 4}" if len(finding.files) > 4 else ""
        rows.append([ICONS[finding.severity], finding.code, finding.message, ", ".join(names) + more])
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def thumbnails(report: Report) -> list[tuple[str, str]]:
    """(image, caption) for the gallery: each finding's images, errors and warnings first."""
    shown: list[tuple[str, str]] = []
    for finding in sorted(report.findings, key=lambda f: ("error", "warning", "info").index(f.severity)):
        if finding.code in _NO_THUMBNAIL:
            continue
        for file in finding.files:
            path = Path(file)
            if len(shown) >= THUMBNAILS:
                return shown
            if path.suffix.lower() in caption_store.IMAGE_EXTENSIONS and path.is_file():
                note = finding.notes.get(file)
                label = f"{finding.severity}: {finding.code} · {path.name}" + (f" ({note})" if note else "")
                shown.append((str(path), label))
    return shown


def render(report: Report) -> tuple[str, pd.DataFrame, list[tuple[str, str]]]:
    return summary_text(report), table_rows(report), thumbnails(report)


def empty(note: str = "") -> tuple[str, pd.DataFrame, list]:
    return note, pd.DataFrame([], columns=TABLE_HEADERS), []


def check_values(runner: JobRunner, data: dict[str, Any], preset: str | None,
                 on_progress: Callable[[int, int], None] | None = None) -> tuple[Report | None, tuple]:
    """(report, the panel's values) for the form's config; a config or path problem is the summary line."""
    if not str(data.get("train_data_dir") or "").strip():
        return None, empty("Pick a dataset folder and press Load: the dataset check runs then.")
    try:
        _, report = doctor.check(runner, data, preset or None, on_progress)
    except ConfigError as exc:
        return None, empty(f"⚠️ {exc}")
    return report, render(report)


def fix_values(runner: JobRunner, data: dict[str, Any], preset: str | None, name: str) -> tuple[str, tuple]:
    """(status message, the panel's values after fix ``name``)."""
    current = runner.current
    if current is not None and current.active:
        return "⚠️ A LoRA is training; fix its dataset after it finishes.", (gr.update(),) * 3
    try:
        result, report = doctor.fix(runner, data, name, preset or None)
    except ConfigError as exc:
        return f"⚠️ {exc}", (gr.update(),) * 3
    return result.summary(), render(report)
