"""The LoRA Train tab: dataset, captions, settings, live training view. The only engine module importing gradio.

Written against what both gradio 3.41 (the WebUI's pin) and current gradio accept: ``gr.update``, no
``Component.update``, keyword arguments filtered by each signature (``_make``), ``_js``/``js`` chosen by
version. Every TrainConfig field gets a widget generated from the dataclass, so a new config key shows up
without UI work.

The training view follows the current job by itself (``follow_job``): a ``gr.Timer`` where gradio has one, an
async generator started by the page's load event on gradio 3 (it waits in the event loop, not in a worker
thread). Train returns at once and Stop skips the queue, so no handler waits behind another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gradio as gr
import pandas as pd
import yaml

from lora_train.caption.choices import CaptionSources
from lora_train.engine import caption_store
from lora_train.engine import config as config_module
from lora_train.engine.config import ConfigError, TrainConfig
from lora_train.engine.files import free_name
from lora_train.webui.jobs import BusyError, HostError, Job, JobRunner
from lora_train.webui.paths import sanitize_name
from lora_train.webui.presets import DEFAULT_PRESET, PRESET_NAMES, preset_values
from lora_train.webui.ui_caption import CaptionRun, caption_controls, wire
from lora_train.webui.uploads import UploadError, import_upload

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
POLL_SECONDS = 1.0
QUEUE_WORKERS = 64
MAIN_FIELDS = ("train_data_dir", "output_name", "trigger_word")
FIELD_HELP = {
    "base_model": "Standalone only: tiny, a .safetensors/.ckpt checkpoint or a diffusers folder. The WebUI trains "
                  "the checkpoint it has loaded.",
    "device": "Standalone only: auto, cpu, cuda, cuda:1 ...",
    "sample_prompts": "One prompt per line; a sample image every 'sample_every_n_steps' steps.",
    "optimizer_args": "YAML mapping, e.g. {weight_decay: 0.01}",
    "output_dir": "Set by the tab: the LoRA goes to the Lora folder; state, checkpoints and samples to the run "
                  "folder (Settings > LoRA Train).",
    "overwrite": "The tab never overwrites: an existing name gets -2, -3 ...",
}
SECTIONS = (
    ("Data", ("metadata_path", "caption_extension", "reg_data_dir", "prior_loss_weight", "resolution",
              "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "shuffle_caption",
              "keep_tokens", "caption_dropout_rate", "cache_latents", "cache_latents_to_disk")),
    ("Model and network", ("base_model", "v_parameterization", "clip_skip", "lora_rank", "lora_alpha",
                           "lora_dropout", "train_text_encoder", "network_weights")),
)


@dataclass
class UISettings:
    """What the host decides about the tab: where uploads go, the captioner's weights, the default preset."""

    datasets_root: Path
    captioner_weights: str | None = None
    default_preset: str = DEFAULT_PRESET
    defaults: dict[str, Any] = field(default_factory=dict)
    captioner_setting: str = "Settings > LoRA Train > Captioner weights"  # named when the weights are missing
    caption_sources: Callable[[], CaptionSources] | None = None  # read at each click; None: CoCa + WD14 only

    def captioners(self) -> CaptionSources:
        return self.caption_sources() if self.caption_sources else CaptionSources(coca_weights=self.captioner_weights)


# ------------------------------------------------------------------------------------------ compatibility
def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``fn`` names in this gradio version (catch-all ``**kwargs`` do not count)."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def _make(cls: type, **kwargs: Any) -> Any:
    """Build a component with only the keyword arguments this gradio version's constructor accepts."""
    return cls(**_accepted(cls.__init__, kwargs))


def enable_queue(demo: gr.Blocks, workers: int = QUEUE_WORKERS) -> gr.Blocks:
    """The standalone server's queue with room for ``workers`` events at once, as the WebUI's ``queue(64)``:
    gradio 3 runs one queued event at a time unless told, so one page's live view would hold every button."""
    if GRADIO_MAJOR >= 4:
        return demo.queue(default_concurrency_limit=workers)
    return demo.queue(concurrency_count=workers)


def _js(code: str) -> dict[str, str]:
    return {"js": code} if GRADIO_MAJOR >= 4 else {"_js": code}


def _file_path(item: Any) -> str:
    """An uploaded file as a path: gradio 3 gives a tempfile wrapper, gradio 4+ a str or a FileData."""
    return str(getattr(item, "name", None) or getattr(item, "path", None) or item)


# ------------------------------------------------------------------------------------------ config widgets
def _annotation(name: str) -> Any:
    return typing.get_type_hints(TrainConfig)[name]


def _optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0], True
    return annotation, False


def _widget(name: str, value: Any) -> Any:
    """One widget for a config field, chosen from its type annotation."""
    kind, optional = _optional(_annotation(name))
    label = name
    info = FIELD_HELP.get(name)
    common = {"label": label, "info": info, "elem_id": f"lora_train_cfg_{name}"}
    if typing.get_origin(kind) is Literal:
        return _make(gr.Dropdown, choices=list(typing.get_args(kind)), value=value, **common)
    if kind is bool and optional:
        return _make(gr.Dropdown, choices=["auto", "true", "false"], value=_to_widget(name, value), **common)
    if kind is bool:
        return _make(gr.Checkbox, value=bool(value), **common)
    if kind in (int, float) and not optional:
        return _make(gr.Number, value=value, precision=0 if kind is int else None, **common)
    lines = 3 if typing.get_origin(kind) in (list, dict) else 1
    placeholder = "not set" if optional else None
    return _make(gr.Textbox, value=_to_widget(name, value), lines=lines, placeholder=placeholder, **common)


def _to_widget(name: str, value: Any) -> Any:
    """A config value as its widget shows it."""
    kind, optional = _optional(_annotation(name))
    if kind is bool and optional:
        return "auto" if value is None else str(bool(value)).lower()
    if typing.get_origin(kind) is list:
        return "\n".join(value or [])
    if typing.get_origin(kind) is dict:
        return yaml.safe_dump(value, default_flow_style=True).strip() if value else ""
    if optional and value is None:
        return ""
    if kind in (int, float) and optional:
        return str(value)
    return value


def _from_widget(name: str, value: Any) -> Any:
    """A widget's value as config data (config.from_dict then checks and coerces it, naming the field)."""
    kind, optional = _optional(_annotation(name))
    if kind is bool and optional:
        return None if value in (None, "", "auto") else value == "true"
    if typing.get_origin(kind) is list:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if typing.get_origin(kind) is dict:
        try:
            parsed = yaml.safe_load(value) if str(value or "").strip() else {}
        except yaml.YAMLError as exc:
            raise ConfigError(name, f"not a YAML mapping: {exc}") from None
        return parsed if parsed is not None else {}
    if isinstance(value, str) and not value.strip() and optional:
        return None
    if isinstance(value, float) and kind is int and value.is_integer():
        return int(value)
    return value


FIELD_NAMES = [f.name for f in dataclasses.fields(TrainConfig)]


def values_to_config(values: list[Any]) -> dict[str, Any]:
    """Widget values, in FIELD_NAMES order, as config data."""
    return {name: _from_widget(name, value) for name, value in zip(FIELD_NAMES, values, strict=True)}


def config_to_values(cfg: TrainConfig | dict[str, Any]) -> list[Any]:
    data = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    return [_to_widget(name, data.get(name)) for name in FIELD_NAMES]


def initial_config(settings: UISettings, family: str | None, device: str = "cuda") -> dict[str, Any]:
    """The form's starting values: config defaults, then the default preset for the family and device, then the
    host's."""
    data = TrainConfig().to_dict()
    data.update(preset_values(settings.default_preset, family, device))
    data.update(settings.defaults)
    return data


# ------------------------------------------------------------------------------------------ dataset helpers
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
    tags = pd.DataFrame(caption_store.tag_frequency(row.caption for row in rows)[:50], columns=TAG_HEADERS)
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


# ------------------------------------------------------------------------------------------ progress
LONG_RUN_S = 3600.0


def loss_frame(job: Job | None) -> pd.DataFrame:
    points = [p for p in job.losses if p[1] is not None] if job else []
    return pd.DataFrame({"step": [p[0] for p in points], "loss": [p[1] for p in points]})


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def time_left(it_per_s: float, eta_s: float, device: str) -> tuple[str, str]:
    """(ETA text, warning) for a running job. Until a step's time is known there is no estimate (not "0:00");
    past an hour the warning says so plainly and what makes the run shorter."""
    if it_per_s <= 0:
        return "ETA estimating…", ""
    if eta_s <= LONG_RUN_S:
        return f"ETA {_duration(eta_s)}", ""
    hours = eta_s / 3600
    about = f"{hours:.0f}" if hours >= 10 or round(hours, 1).is_integer() else f"{hours:.1f}"
    where = device.split(":")[0]
    where = "CPU" if where == "cpu" else "GPU" if where == "cuda" else where
    return (f"ETA {_duration(eta_s)}",
            f"⚠️ This run will take about {about} h on this {where}; lower max_train_steps or resolution.")


def _rate(it_per_s: float) -> str:
    """Speed as people read it: steps per second, or seconds per step when slower than one a second."""
    return f"{it_per_s:.2f} it/s" if it_per_s >= 1 else f"{1 / it_per_s:.1f} s/it"


def progress_text(job: Job | None, device: str = "cuda") -> str:
    """The status line (Markdown) for the current job: state, step, speed, ETA, and where its files are."""
    if job is None:
        return "Idle."
    name = f"**{job.cfg.output_name}**"
    state_dir = f"Checkpoints and resumable state: `{job.cfg.output_dir}`"
    if job.state in ("queued", "waiting"):
        return f"{name}: starting (waiting for the model)…"
    if job.state == "failed":
        where = f" (field `{job.error_key}`)" if job.error_key else ""
        return f"**Failed**{where}: {job.error}" + (f"\n\n{state_dir}" if job.step else "")
    loss = f" · loss {job.loss:.4f}" if job.loss is not None else ""
    if job.state == "running":
        if not job.total:
            return f"{name}: preparing (model, latents)…\n\n{state_dir}"
        eta, warning = time_left(job.it_per_s, job.eta_s, device)
        speed = f" · {_rate(job.it_per_s)}" if job.it_per_s > 0 else ""
        lines = [f"{name}: step {job.step}/{job.total}{speed} · {eta}{loss}", warning, state_dir]
        return "\n\n".join(line for line in lines if line)
    head = f"**{job.state.capitalize()}** — {job.cfg.output_name}: step {job.step}/{job.total}{loss}"
    if job.output is None:
        return f"{head}\n\nStopped before the first step; nothing was saved."
    return f"{head}\n\nSaved `{job.output}` · in a prompt: `{job.snippet}`\n\n{state_dir}"


@dataclass(frozen=True)
class Sent:
    """What one page was last sent, so a poll re-sends only what changed (not the sample image every second)."""

    job: str | None
    state: str
    points: int
    sample_step: int
    log_tail: str


def live_updates(job: Job | None, sent: Sent | None, device: str) -> tuple[list[Any], Sent]:
    """Updates for (progress, loss plot, sample, log, result group, output path, snippet) and what they show.

    ``sent`` None means the page shows nothing yet (just loaded): everything is sent.
    """
    now = Sent(job.id if job else None, job.state if job else "", len(job.losses) if job else 0,
               job.sample_step if job else 0, job.log[-1] if job and job.log else "")
    fresh = sent is None or sent.job != now.job
    done = job is not None and not job.active and job.output is not None

    def changed(*fields: str) -> bool:
        return fresh or any(getattr(sent, f) != getattr(now, f) for f in fields)

    keep = gr.update()
    updates = [
        progress_text(job, device),
        loss_frame(job) if changed("points", "state") else keep,
        (job.sample if job else None) if changed("sample_step") else keep,
        "\n".join(job.log[-200:]) if job and changed("log_tail") else ("" if fresh else keep),
        gr.update(visible=done) if changed("state") else keep,
        (str(job.output) if done else "") if changed("state") else keep,
        (job.snippet if done else "") if changed("state") else keep,
    ]
    return updates, now


# ------------------------------------------------------------------------------------------ the Blocks
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
                    widgets["train_data_dir"] = _make(
                        gr.Textbox, label="Dataset folder", value=start.get("train_data_dir") or "",
                        placeholder="folder with images (+ .txt captions or metadata.csv)", scale=4,
                        elem_id="lora_train_cfg_train_data_dir")
                    load_button = _make(gr.Button, value="Load", scale=1, elem_id="lora_train_load")
                with gr.Accordion("Upload images or a zip into a new dataset folder", open=False):
                    upload_name = _make(gr.Textbox, label="New dataset name", value="dataset",
                                        elem_id="lora_train_upload_name")
                    upload_files = _make(gr.File, label="Images, captions or .zip", file_count="multiple",
                                         elem_id="lora_train_upload")
                with gr.Row():
                    widgets["output_name"] = _make(gr.Textbox, label="LoRA name", value=start["output_name"],
                                                   elem_id="lora_train_cfg_output_name")
                    widgets["trigger_word"] = _make(gr.Textbox, label="Trigger word",
                                                    value=start.get("trigger_word") or "",
                                                    elem_id="lora_train_cfg_trigger_word")
                    preset = _make(gr.Dropdown, label="Preset", choices=list(PRESET_NAMES),
                                   value=settings.default_preset, elem_id="lora_train_preset")
                family_note = _make(gr.Markdown, value=_family_text(family), elem_id="lora_train_family")
            with gr.Column(scale=2):
                with gr.Row():
                    train_button = _make(gr.Button, value="Train", variant="primary", elem_id="lora_train_train")
                    stop_button = _make(gr.Button, value="Stop", elem_id="lora_train_stop")
                progress = _make(gr.Markdown, value=progress_text(runner.current, host.device_type()),
                                 elem_id="lora_train_progress")
                status = _make(gr.Markdown, value="", elem_id="lora_train_status")
                with _make(gr.Group, visible=False, elem_id="lora_train_result") as result_group:
                    output_path = _make(gr.Textbox, label="Saved to", interactive=False,
                                        elem_id="lora_train_output")
                    snippet = _make(gr.Textbox, label="Prompt snippet", interactive=False,
                                    show_copy_button=True, elem_id="lora_train_snippet")
                    send_button = _make(gr.Button, value="Send to txt2img", visible=host.in_webui,
                                        elem_id="lora_train_send")

        with gr.Tabs():
            with gr.Tab("Captions"):
                caption_ui = caption_controls(_make, settings.captioners())
                with gr.Row():
                    save_button = _make(gr.Button, value="Save captions", elem_id="lora_train_save_captions")
                missing_note = _make(gr.Markdown, value="", elem_id="lora_train_missing")
                with gr.Row():
                    with gr.Column(scale=3):
                        table = _make(gr.Dataframe, headers=CAPTION_HEADERS, datatype=["str", "str"],
                                      type="array", interactive=True, wrap=True, label="Captions (editable)",
                                      elem_id="lora_train_captions")
                    with gr.Column(scale=2):
                        gallery = _make(gr.Gallery, label="Images", columns=4, height=360, object_fit="contain",
                                        elem_id="lora_train_gallery")
                with gr.Row():
                    find_text = _make(gr.Textbox, label="Find", elem_id="lora_train_find")
                    replace_text = _make(gr.Textbox, label="Replace with", elem_id="lora_train_replace")
                    regex = _make(gr.Checkbox, label="Regular expression", value=False)
                    replace_button = _make(gr.Button, value="Replace in all captions", elem_id="lora_train_do_replace")
                tags = _make(gr.Dataframe, headers=TAG_HEADERS, datatype=["str", "number"], type="array",
                             interactive=False, label="Tag frequency", elem_id="lora_train_tags")
            with gr.Tab("Training"):
                with gr.Row():
                    with gr.Column(scale=3):
                        loss_plot = _make(gr.LinePlot, value=loss_frame(None), x="step", y="loss",
                                          title="Training loss", height=260, width=520,
                                          elem_id="lora_train_loss")
                    with gr.Column(scale=2):
                        sample = _make(gr.Image, label="Latest sample", interactive=False, type="pil",
                                       elem_id="lora_train_sample")
                log = _make(gr.Textbox, label="Log", lines=8, max_lines=8, interactive=False,
                            elem_id="lora_train_log")

        with gr.Accordion("Advanced (every config field)", open=False, elem_id="lora_train_advanced"):
            grouped = {name for _, names in SECTIONS for name in names} | set(MAIN_FIELDS)
            sections = [*SECTIONS, ("Optimisation and output", tuple(n for n in FIELD_NAMES if n not in grouped))]
            for title, names in sections:
                _make(gr.Markdown, value=f"#### {title}")
                for chunk in range(0, len(names), 4):
                    with gr.Row():
                        for name in names[chunk:chunk + 4]:
                            widgets[name] = _widget(name, start.get(name))
            with gr.Row():
                config_file = _make(gr.File, label="Load config (YAML)", file_types=[".yaml", ".yml"],
                                    elem_id="lora_train_config_in")
                save_config_button = _make(gr.Button, value="Save config", elem_id="lora_train_save_config")
                config_out = _make(gr.File, label="Saved config", interactive=False, elem_id="lora_train_config_out")

        fields = [widgets[name] for name in FIELD_NAMES]
        dataset_outputs = [table, gallery, missing_note, tags]
        live_outputs = [progress, loss_plot, sample, log, result_group, output_path, snippet]

        # -- dataset --------------------------------------------------------------------------------------
        def load_dataset(folder: str):
            try:
                return (*dataset_view(folder, runner), "")
            except (ConfigError, FileNotFoundError, caption_store.CaptionFileError) as exc:
                return (*empty_view(), f"⚠️ {exc}")

        load_button.click(load_dataset, [widgets["train_data_dir"]], [*dataset_outputs, status])
        widgets["train_data_dir"].submit(load_dataset, [widgets["train_data_dir"]], [*dataset_outputs, status])

        def upload(files: Any, name: str):
            if not files:
                return gr.update(), *empty_view(), "Choose files to upload first."
            try:
                root = Path(settings.datasets_root)
                folder = root / free_name(root, sanitize_name(name or "dataset", fallback="dataset"))
                report = import_upload([_file_path(f) for f in files], folder)
            except (UploadError, ConfigError, OSError) as exc:
                return gr.update(), *empty_view(), f"⚠️ Upload refused: {exc}"
            view = dataset_view(str(report.folder), runner)
            return str(report.folder), *view, f"Uploaded {report.summary()}."

        upload_files.upload(upload, [upload_files, upload_name],
                            [widgets["train_data_dir"], *dataset_outputs, status])

        def save(folder: str, rows: Any):
            try:
                message = save_table(folder, rows, runner)
                return (*dataset_view(folder, runner), message)
            except (ConfigError, FileNotFoundError, caption_store.CaptionFileError) as exc:
                return gr.update(), gr.update(), gr.update(), gr.update(), f"⚠️ {exc}"

        save_button.click(save, [widgets["train_data_dir"], table], [*dataset_outputs, status])

        def replace(folder: str, rows: Any, find: str, replacement: str, use_regex: bool):
            try:
                runner.policy.check_input(folder, "train_data_dir")
                captions = {name: caption for name, caption in _table_rows(rows)}
                changed = caption_store.find_replace(captions, find, replacement, regex=use_regex)
                caption_store.save_captions(folder, changed)
                return (*dataset_view(folder, runner), f"Changed {len(changed)} caption(s).")
            except (ConfigError, FileNotFoundError, caption_store.CaptionFileError) as exc:
                return gr.update(), gr.update(), gr.update(), gr.update(), f"⚠️ {exc}"

        replace_button.click(replace, [widgets["train_data_dir"], table, find_text, replace_text, regex],
                             [*dataset_outputs, status])

        wire(caption_ui, CaptionRun(runner, settings.captioners), widgets["train_data_dir"], widgets["trigger_word"],
             [*dataset_outputs, status], lambda folder: dataset_view(folder, runner), settings.captioner_setting)

        # -- presets and config files ---------------------------------------------------------------------
        preset_names = list(preset_values(DEFAULT_PRESET, None))

        def apply_preset(name: str):
            values = host.preset(name)
            return [gr.update(value=_to_widget(key, values[key])) for key in preset_names] + \
                [_family_text(host.family())]

        preset.change(apply_preset, [preset], [widgets[k] for k in preset_names] + [family_note])

        def load_config(file: Any):
            if file is None:
                return [gr.update() for _ in FIELD_NAMES] + [""]
            try:
                cfg = config_module.load(_file_path(file))
            except ConfigError as exc:
                return [gr.update() for _ in FIELD_NAMES] + [f"⚠️ {exc}"]
            return config_to_values(cfg) + [f"Loaded {Path(_file_path(file)).name}."]

        config_file.upload(load_config, [config_file], [*fields, status])

        def save_config(*values: Any):
            try:
                cfg = config_module.from_dict(values_to_config(list(values)))
            except ConfigError as exc:
                return None, f"⚠️ {exc}"
            folder = Path(tempfile.mkdtemp(prefix="lora-train-config-"))
            path = folder / f"{sanitize_name(cfg.output_name, fallback='lora')}.yaml"
            path.write_text(config_module.dump(cfg), encoding="utf-8")
            return str(path), f"Config written: {path.name}"

        save_config_button.click(save_config, fields, [config_out, status])

        # -- training -------------------------------------------------------------------------------------
        def start(*values: Any):
            try:
                job = runner.submit(values_to_config(list(values)))
            except (ConfigError, HostError, BusyError) as exc:
                return progress_text(runner.current, host.device_type()), f"⚠️ {exc}"
            return progress_text(job, host.device_type()), f"Started **{job.cfg.output_name}** (Stop keeps what is " \
                "trained so far)."

        train_button.click(start, fields, [progress, status])

        def stop() -> str:
            job = runner.current
            if job is None or not job.active:
                return "Nothing is training."
            runner.stop(job.id)  # first, so the step read below is at least the last one that will run
            return f"Stopping after the current step (step {job.step + 1} of {job.total}); the LoRA trained " \
                "so far is saved."

        stop_button.click(stop, [], [status], queue=False)  # never behind another event in the queue
        follow_job(demo, runner, live_outputs)
        send_button.click(None, [snippet], [], **_js("(text) => { loraTrainSendToTxt2img(text); return []; }"))
    return demo


def follow_job(demo: gr.Blocks, runner: JobRunner, outputs: list[Any]) -> None:
    """Keep ``outputs`` (see ``live_updates``) on the runner's current job while the page is open, also a job
    started elsewhere (another tab, the API) and after a reload."""
    def current(sent: Sent | None) -> tuple[list[Any], Sent]:
        # the host's device only while a job runs: in the WebUI, reading the model before one is loaded loads it
        job = runner.current
        return live_updates(job, sent, runner.host.device_type() if job is not None and job.state == "running" else "")

    if hasattr(gr, "Timer"):  # gradio >= 4.40: the browser ticks, each tick is one short call
        sent_state = gr.State(None)

        def tick(sent: Sent | None):
            updates, sent = current(sent)
            return [*updates, sent]

        gr.Timer(POLL_SECONDS).tick(tick, [sent_state], [*outputs, sent_state], show_progress="hidden",
                                    concurrency_limit=None)
        return

    async def watch():  # gradio 3: one generator per page, waiting in the event loop; ends when the page closes
        sent = None
        while True:
            updates, sent = await asyncio.to_thread(current, sent)  # never block the server's event loop
            yield updates
            await asyncio.sleep(POLL_SECONDS)

    # gradio 4.0-4.39 (no Timer) allow one run of an event at a time unless told: every page runs its own
    demo.load(watch, [], outputs, **_accepted(demo.load, {"show_progress": "hidden", "concurrency_limit": None}))


def _family_text(family: str | None) -> str:
    if family is None:
        return "Model: not known yet (presets use SD1 values)."
    return f"Model family: **{family.upper()}** (presets tuned for it)."
