"""The tab's dataset side: the caption table and gallery, find/replace, uploads into a new folder, captioning.

``captions_tab`` builds the Captions tab and wires it and the dataset controls at the top of the page; the plain
functions around it do the work so tests call them without a browser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lora_train.engine.config.settings import ConfigError
from lora_train.engine.data import caption_store, caption_text
from lora_train.engine.files import free_name
from lora_train.webui.jobs import JobRunner
from lora_train.webui.paths import sanitize_name
from lora_train.webui.ui_caption import CaptionRun, caption_controls, wire
from lora_train.webui.ui_fields import UISettings
from lora_train.webui.ui_gradio import file_path, make
from lora_train.webui.uploads import UploadError, import_upload

CAPTION_HEADERS = ["image", "caption"]
TAG_HEADERS = ["tag", "count"]


def _rows(folder: str) -> list[caption_store.CaptionRow]:
    return caption_store.list_rows(folder)


def empty_view(note: str = "") -> tuple[pd.DataFrame, list, str, pd.DataFrame]:
    """The dataset widgets with nothing loaded; frames keep their column names (a bare [] shows "1", "2")."""
    return pd.DataFrame([], columns=CAPTION_HEADERS), [], note, pd.DataFrame([], columns=TAG_HEADERS)


def dataset_view(folder: str, runner: JobRunner) -> tuple[pd.DataFrame, list[tuple[str, str]], str, pd.DataFrame]:
    """(caption table, gallery, missing-caption note, tag frequency) for a dataset folder."""
    if not str(folder or "").strip():
        return empty_view("Pick a dataset folder or upload images.")
    path = runner.policy.check_input(folder, "train_data_dir")
    rows = _rows(str(path))
    if not rows:
        return empty_view(f"No images in {path}.")
    table = pd.DataFrame([[row.name, row.caption or ""] for row in rows], columns=CAPTION_HEADERS)
    gallery = [(str(row.image), row.name) for row in rows[:200]]
    missing = caption_store.missing_captions(rows)
    if missing:
        note = f"**{len(missing)} of {len(rows)} image(s) have no caption:** {', '.join(missing[:10])}"
    else:
        note = f"{len(rows)} image(s), all captioned."
    tags = pd.DataFrame(caption_text.tag_frequency(row.caption for row in rows)[:50], columns=TAG_HEADERS)
    return table, gallery, note, tags


def _table_rows(table: Any) -> list[list[str]]:
    if table is None:
        return []
    if isinstance(table, pd.DataFrame):
        table = table.values.tolist()
    if isinstance(table, dict):  # gradio 4+ may send {"headers": [...], "data": [...]}
        table = table.get("data", [])
    return [[str(r[0]), "" if r[1] is None else str(r[1])] for r in table if r and str(r[0]).strip()]


def save_table(folder: str, table: Any, runner: JobRunner) -> str:
    """Write edited captions back (only rows that changed)."""
    path = runner.policy.check_input(folder, "train_data_dir")
    current = {row.name: row.caption or "" for row in _rows(str(path))}
    edits = {name: caption for name, caption in _table_rows(table) if name in current
             and caption.strip() != current[name].strip() and caption.strip()}
    written = caption_store.save_captions(path, edits)
    return f"Saved {len(edits)} caption(s) to {len(written)} file(s)." if edits else "No caption changed."


@dataclass
class CaptionsTab:
    """What other parts of the tab reuse: the dataset view's outputs (the last is the status line), the handler
    that fills them for a folder, and the caption handler with its inputs but the last (replace existing)."""

    outputs: list[Any]
    load: Callable[[str], tuple]
    caption: Callable[..., tuple]
    caption_inputs: list[Any]


def captions_tab(runner: JobRunner, settings: UISettings, folder: Any, trigger: Any, load_button: Any,
                 upload_name: Any, upload_files: Any, status: Any) -> CaptionsTab:
    """The Captions tab's widgets, and the handlers of it and of the dataset controls (``folder`` and the rest
    are the top row's widgets; ``status`` gets each handler's message)."""
    caption_ui = caption_controls(make, settings.captioners())
    with gr.Row():
        save_button = make(gr.Button, value="Save captions", elem_id="lora_train_save_captions")
    missing_note = make(gr.Markdown, value="", elem_id="lora_train_missing")
    with gr.Row():
        with gr.Column(scale=3):
            table = make(gr.Dataframe, headers=CAPTION_HEADERS, datatype=["str", "str"], type="array",
                         interactive=True, wrap=True, label="Captions (editable)", elem_id="lora_train_captions")
        with gr.Column(scale=2):
            gallery = make(gr.Gallery, label="Images", columns=4, height=360, object_fit="contain",
                           elem_id="lora_train_gallery")
    with gr.Row():
        find_text = make(gr.Textbox, label="Find", elem_id="lora_train_find")
        replace_text = make(gr.Textbox, label="Replace with", elem_id="lora_train_replace")
        regex = make(gr.Checkbox, label="Regular expression", value=False)
        replace_button = make(gr.Button, value="Replace in all captions", elem_id="lora_train_do_replace")
    tags = make(gr.Dataframe, headers=TAG_HEADERS, datatype=["str", "number"], type="array", interactive=False,
                label="Tag frequency", elem_id="lora_train_tags")
    outputs = [table, gallery, missing_note, tags, status]
    unchanged = (gr.update(), gr.update(), gr.update(), gr.update())

    def load_dataset(folder: str):
        try:
            return (*dataset_view(folder, runner), "")
        except (ConfigError, FileNotFoundError, caption_store.CaptionFileError) as exc:
            return (*empty_view(), f"⚠️ {exc}")

    load_button.click(load_dataset, [folder], outputs)
    folder.submit(load_dataset, [folder], outputs)

    def upload(files: Any, name: str):
        if not files:
            return gr.update(), *empty_view(), "Choose files to upload first."
        try:
            root = Path(settings.datasets_root)
            target = root / free_name(root, sanitize_name(name or "dataset", fallback="dataset"))
            report = import_upload([file_path(f) for f in files], target)
        except (UploadError, ConfigError, OSError) as exc:
            return gr.update(), *empty_view(), f"⚠️ Upload refused: {exc}"
        view = dataset_view(str(report.folder), runner)
        return str(report.folder), *view, f"Uploaded {report.summary()}."

    upload_files.upload(upload, [upload_files, upload_name], [folder, *outputs])

    def save(folder: str, rows: Any):
        try:
            message = save_table(folder, rows, runner)
            return (*dataset_view(folder, runner), message)
        except (ConfigError, FileNotFoundError, caption_store.CaptionFileError) as exc:
            return *unchanged, f"⚠️ {exc}"

    save_button.click(save, [folder, table], outputs)

    def replace(folder: str, rows: Any, find: str, replacement: str, use_regex: bool):
        try:
            runner.policy.check_input(folder, "train_data_dir")
            captions = {name: caption for name, caption in _table_rows(rows)}
            changed = caption_text.find_replace(captions, find, replacement, regex=use_regex)
            caption_store.save_captions(folder, changed)
            return (*dataset_view(folder, runner), f"Changed {len(changed)} caption(s).")
        except (ConfigError, FileNotFoundError, caption_store.CaptionFileError) as exc:
            return *unchanged, f"⚠️ {exc}"

    replace_button.click(replace, [folder, table, find_text, replace_text, regex], outputs)

    caption, caption_inputs = wire(caption_ui, CaptionRun(runner, settings.captioners), folder, trigger, outputs,
                                   lambda path: dataset_view(path, runner), settings.captioner_setting,
                                   settings.downloads_setting)
    return CaptionsTab(outputs, load_dataset, caption, caption_inputs)
