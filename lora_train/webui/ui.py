"""The LoRA Train tab's Blocks: dataset and name at the top, Train/Stop, the Dataset check, Captions and Training
tabs, and every config field under Advanced. One builder for the WebUI and the standalone ``ui`` command.

Written against what both gradio 3.41 (the WebUI's pin) and current gradio accept (``ui_gradio``). The fields'
widgets come from the config's metadata (``ui_fields``), the dataset side from ``ui_dataset``, the live view
from ``ui_status``. Train returns at once and Stop skips the queue, so no handler waits behind another.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from lora_train.engine.config import yaml_io
from lora_train.engine.config.settings import ConfigError
from lora_train.engine.data.doctor import Report
from lora_train.webui.jobs import BusyError, HostError, JobRunner
from lora_train.webui.paths import sanitize_name
from lora_train.webui.presets import DEFAULT_PRESET, PRESET_HELP, PRESET_NAMES, preset_values
from lora_train.webui.ui_dataset import captions_tab
from lora_train.webui.ui_doctor import check_values, doctor_panel, doctor_summary, fix_values
from lora_train.webui.ui_fields import (
    FIELD_NAMES,
    UISettings,
    config_panel,
    config_to_values,
    initial_config,
    to_widget,
    values_to_config,
    widget,
)
from lora_train.webui.ui_gradio import enable_queue, file_path, js, make
from lora_train.webui.ui_grid import grid_panel
from lora_train.webui.ui_status import follow_job, loss_frame, progress_text, validation_text

__all__ = ["UISettings", "build_ui", "enable_queue"]  # what the WebUI glue and the ui command use
DOCTOR_TAB = "doctor"


def build_ui(runner: JobRunner, settings: UISettings) -> gr.Blocks:
    """The tab's Blocks over ``runner`` (the WebUI host or the standalone diffusers host)."""
    host = runner.host
    family = host.family()
    start = initial_config(settings, family, host.device_type())
    widgets: dict[str, Any] = {}

    with gr.Blocks(analytics_enabled=False, title="LoRA Train") as demo:
        with gr.Row(elem_id="lora_train_top"):
            with gr.Column(scale=3):
                with gr.Row():
                    widgets["train_data_dir"] = widget(
                        "train_data_dir", start.get("train_data_dir"), scale=4,
                        placeholder="folder with images (+ .txt captions or metadata.csv)")
                    load_button = make(gr.Button, value="Load", scale=1, elem_id="lora_train_load")
                with gr.Accordion("Upload images or a zip into a new dataset folder", open=False):
                    upload_name = make(gr.Textbox, label="New dataset name", value="dataset",
                                       elem_id="lora_train_upload_name")
                    upload_files = make(gr.File, label="Images, captions or .zip", file_count="multiple",
                                        elem_id="lora_train_upload")
                with gr.Row():
                    widgets["output_name"] = widget("output_name", start["output_name"])
                    widgets["trigger_word"] = widget("trigger_word", start.get("trigger_word"))
                    preset = make(gr.Dropdown, label="Preset", choices=list(PRESET_NAMES), info=PRESET_HELP,
                                  value=settings.default_preset, elem_id="lora_train_preset")
                family_note = make(gr.Markdown, value=_family_text(family, host.generation_notes()),
                                   elem_id="lora_train_family")
                doctor_line = doctor_summary()
            with gr.Column(scale=2):
                with gr.Row():
                    train_button = make(gr.Button, value="Train", variant="primary", elem_id="lora_train_train")
                    stop_button = make(gr.Button, value="Stop", elem_id="lora_train_stop")
                progress = make(gr.Markdown, value=progress_text(runner.current, host.device_type()),
                                elem_id="lora_train_progress")
                status = make(gr.Markdown, value="", elem_id="lora_train_status")
                with make(gr.Group, visible=False, elem_id="lora_train_result") as result_group:
                    output_path = make(gr.Textbox, label="Saved to", interactive=False, elem_id="lora_train_output")
                    snippet = make(gr.Textbox, label="Prompt snippet", interactive=False, show_copy_button=True,
                                   elem_id="lora_train_snippet")
                    send_button = make(gr.Button, value="Send to txt2img", visible=host.in_webui,
                                       elem_id="lora_train_send")

        with make(gr.Tabs, elem_id="lora_train_tabs") as tabs:
            with make(gr.Tab, label="Captions", id="captions"):
                captions = captions_tab(runner, settings, widgets["train_data_dir"], widgets["trigger_word"],
                                        load_button, upload_name, upload_files, status)
            with make(gr.Tab, label="Dataset check", id=DOCTOR_TAB, elem_id="lora_train_doctor_tab"):
                panel = doctor_panel(doctor_line)
            with make(gr.Tab, label="Training", id="training"):
                with gr.Row():
                    with gr.Column(scale=3):
                        # points drawn too: a short run reads the training loss once, and one point makes no line
                        loss_plot = make(gr.LinePlot, value=loss_frame(None), x="step", y="loss", color="series",
                                         title="Loss (training and validation)", height=260, width=520,
                                         overlay_point=True, elem_id="lora_train_loss")
                        validation_note = make(gr.Markdown, value=validation_text(None),
                                               elem_id="lora_train_validation")
                    with gr.Column(scale=2):
                        sample = make(gr.Image, label="Latest sample", interactive=False, type="pil",
                                      elem_id="lora_train_sample")
                log = make(gr.Textbox, label="Log", lines=8, max_lines=8, interactive=False, elem_id="lora_train_log")
            with gr.Tab("Grid"):
                grid_panel(runner)

        with gr.Accordion("Advanced (every config field)", open=False, elem_id="lora_train_advanced"):
            widgets.update(config_panel(start, host.in_webui, host.generation_notes()))
            with gr.Row():
                config_file = make(gr.File, label="Load config (YAML)", file_types=[".yaml", ".yml"],
                                   elem_id="lora_train_config_in")
                save_config_button = make(gr.Button, value="Save config", elem_id="lora_train_save_config")
                config_out = make(gr.File, label="Saved config", interactive=False, elem_id="lora_train_config_out")

        fields = [widgets[name] for name in FIELD_NAMES]
        live_outputs = [progress, loss_plot, validation_note, sample, log, result_group, output_path, snippet]

        # -- presets and config files ---------------------------------------------------------------------
        preset_names = list(preset_values(DEFAULT_PRESET, None))

        def apply_preset(name: str):
            values = host.preset(name)
            return [gr.update(value=to_widget(key, values[key])) for key in preset_names] + \
                [_family_text(host.family(), host.generation_notes())]

        preset.change(apply_preset, [preset], [widgets[k] for k in preset_names] + [family_note])

        def load_config(file: Any):
            if file is None:
                return [gr.update() for _ in FIELD_NAMES] + [""]
            try:
                cfg = yaml_io.load(file_path(file))
            except ConfigError as exc:
                return [gr.update() for _ in FIELD_NAMES] + [f"⚠️ {exc}"]
            return config_to_values(cfg) + [f"Loaded {Path(file_path(file)).name}."]

        config_file.upload(load_config, [config_file], [*fields, status])

        def save_config(*values: Any):
            try:
                cfg = yaml_io.from_dict(values_to_config(list(values)))
            except ConfigError as exc:
                return None, f"⚠️ {exc}"
            folder = Path(tempfile.mkdtemp(prefix="lora-train-config-"))
            path = folder / f"{sanitize_name(cfg.output_name, fallback='lora')}.yaml"
            path.write_text(yaml_io.dump(cfg), encoding="utf-8")
            return str(path), f"Config written: {path.name}"

        save_config_button.click(save_config, fields, [config_out, status])

        # -- the dataset check (on Load, on Train, after each fix) ------------------------------------------
        # gradio hands a Progress only to a positional parameter, so it comes before the form's values
        def check(progress: gr.Progress = gr.Progress(), *values: Any):  # noqa: B008 - gradio's progress bar
            def on_progress(done: int, total: int) -> None:
                progress((done, total), desc="Checking images", unit="images")

            report, view = check_values(runner, values_to_config(list(values[:-1])), values[-1], on_progress)
            return (*view, _show_errors(report))

        for event in (load_button.click, widgets["train_data_dir"].submit, panel.check_button.click):
            event(check, [*fields, preset], [*panel.outputs, tabs])

        def fixer(name: str) -> Callable[..., tuple]:
            def fix(*values: Any):
                message, view = fix_values(runner, values_to_config(list(values[:-1])), values[-1], name)
                return (message, *view)

            return fix

        def refresh_captions(folder: str):
            """The Captions tab after a fix, leaving the status line with the fix's message."""
            return captions.load(folder)[:-1]

        for button, name in ((panel.exclude_button, "exclude"), (panel.trigger_button, "trigger"),
                             (panel.tags_button, "tags")):
            button.click(fixer(name), [*fields, preset], [status, *panel.outputs]).then(
                refresh_captions, [widgets["train_data_dir"]], captions.outputs[:-1])
        panel.caption_button.click(captions.caption, [*captions.caption_inputs, make(gr.State, value=False)],
                                   captions.outputs).then(check, [*fields, preset], [*panel.outputs, tabs])

        # -- training -------------------------------------------------------------------------------------
        def start(*values: Any):
            report, view = check_values(runner, values_to_config(list(values[:-1])), values[-1])
            if report is not None and report.errors:  # the doctor's errors stop Train, in its own words
                reasons = " ".join(finding.message for finding in report.errors)
                return (progress_text(runner.current, host.device_type()), f"⚠️ Not started: {reasons}", *view,
                        _show_errors(report))
            try:
                job = runner.submit(values_to_config(list(values[:-1])))
            except (ConfigError, HostError, BusyError) as exc:
                return progress_text(runner.current, host.device_type()), f"⚠️ {exc}", *view, gr.update()
            return progress_text(job, host.device_type()), f"Started **{job.cfg.output_name}** (Stop keeps what is " \
                "trained so far).", *view, gr.update()

        train_button.click(start, [*fields, preset], [progress, status, *panel.outputs, tabs])

        def stop() -> str:
            job = runner.current
            if job is None or not job.active:
                return "Nothing is training."
            runner.stop(job.id)  # first, so the step read below is at least the last one that will run
            return f"Stopping after the current step (step {job.step + 1} of {job.total}); the LoRA trained " \
                "so far is saved."

        stop_button.click(stop, [], [status], queue=False)  # never behind another event in the queue
        follow_job(demo, runner, live_outputs)
        send_button.click(None, [snippet], [], **js("(text) => { loraTrainSendToTxt2img(text); return []; }"))
    return demo


def _show_errors(report: Report | None) -> Any:
    """Bring the Dataset check forward when it found errors (Train is blocked); otherwise leave the tabs."""
    return gr.update(selected=DOCTOR_TAB) if report is not None and report.errors else gr.update()


def _family_text(family: str | None, notes: dict[str, str] | None = None) -> str:
    """The loaded model's family, and what unset keys follow on this host (e.g. the WebUI's Clip skip)."""
    text = ("Model: not known yet (presets use SD1 values)." if family is None
            else f"Model family: **{family.upper()}** (presets tuned for it).")
    for key, note in (notes or {}).items():
        text += f" `{key}` {note}."
    return text
