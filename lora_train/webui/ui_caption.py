"""The tab's captioning controls: captioner choice, WD14 threshold, replace, preview, Stop, one progress bar.

Captioning runs under the host's ``exclusive()`` lock (the WebUI's queue lock), never beside training or a
generation; the captioner stays loaded between clicks and is freed when training starts.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from lora_train.caption import choices, loaded
from lora_train.caption.choices import CaptionSources
from lora_train.caption.coca_weights import DEFAULT_MODEL, PRETRAINED, WEIGHT_FILE_NAMES
from lora_train.caption.errors import CaptionerError, WeightsMissingError
from lora_train.caption.options import CaptionOptions
from lora_train.caption.run import ImageCaptioner, caption_images, preview_captions
from lora_train.engine.data import caption_store
from lora_train.webui.jobs import BusyError, JobRunner

DOWNLOADS_SETTING = "Settings > LoRA Train > Allow captioner downloads"
PREVIEW_COUNT = 4


@dataclass
class CaptionControls:
    """The widgets ``caption_controls`` made; ``wire`` connects them."""

    captioner: Any
    threshold: Any
    replace: Any
    preview_button: Any
    caption_button: Any
    stop_button: Any
    preview: Any


def caption_controls(make: Callable[..., Any], sources: CaptionSources) -> CaptionControls:
    """The captioning rows of the Captions tab (``make`` builds a component for this gradio version)."""
    with gr.Row():
        captioner = make(gr.Dropdown, label="Captioner", choices=choices.names(sources),
                         value=choices.default_choice(sources), elem_id="lora_train_captioner")
        threshold = make(gr.Slider, label="WD14 tag threshold", minimum=0.05, maximum=1.0, step=0.01, value=0.35,
                         elem_id="lora_train_caption_threshold")
        replace = make(gr.Checkbox, label="Replace existing captions", value=False)
    with gr.Row():
        preview_button = make(gr.Button, value="Preview captions", elem_id="lora_train_caption_preview")
        caption_button = make(gr.Button, value="Caption images", elem_id="lora_train_caption")
        stop_button = make(gr.Button, value="Stop captioning", elem_id="lora_train_caption_stop")
    preview = make(gr.Textbox, label=f"Preview of the first {PREVIEW_COUNT} captions (nothing written)", lines=4,
                   interactive=False, elem_id="lora_train_caption_preview_text")
    return CaptionControls(captioner, threshold, replace, preview_button, caption_button, stop_button, preview)


def captioner_weights_text(weights: str | None, setting: str) -> str:
    """The tab's "no CoCa weights" message: which file to get, and the tab's own ``setting`` to point at it (the
    captioner's own message names CLI flags the tab does not have)."""
    tag, repo = PRETRAINED[DEFAULT_MODEL]
    head = f"Captioner weights not found at {weights}." if weights else "No captioner weights are set."
    return (f"{head} Download {WEIGHT_FILE_NAMES[1]} (open_clip {DEFAULT_MODEL}, '{tag}') from "
            f"https://huggingface.co/{repo} and enter its path in {setting}.")


def missing_text(name: str, exc: WeightsMissingError, sources: CaptionSources, setting: str,
                 downloads_setting: str = DOWNLOADS_SETTING) -> str:
    """What the tab says when a captioner's weights are not here: the fix in the tab's terms, then what every
    captioner needs."""
    if name == choices.COCA and sources.coca_weights:
        text = captioner_weights_text(sources.coca_weights, setting)
    elif exc.downloads_off:
        text = f"{exc} Or turn on {downloads_setting}."
    else:
        text = f"{exc} Or enter the file's path in {setting}." if name == choices.COCA else str(exc)
    return f"{text}\n{choices.needs_line(sources)}"


class CaptionRun:
    """One tab's captioning: the captioner for a choice, the lock, Stop."""

    def __init__(self, runner: JobRunner, sources: Callable[[], CaptionSources]) -> None:
        self.runner = runner
        self.sources = sources
        self.stop = threading.Event()

    def current_sources(self) -> CaptionSources:
        """The host's captioners, on the device the host trains on (the WebUI's own, e.g. CPU with --use-cpu)."""
        return dataclasses.replace(self.sources(), device=self.runner.host.device_type())

    def captioner(self, name: str, threshold: float, sources: CaptionSources) -> ImageCaptioner:
        key = (name, float(threshold), sources.coca_weights, str(sources.models_dir), sources.device)
        return loaded.get_captioner(key, lambda: choices.build(name, sources, float(threshold)))

    def refuse_while_training(self) -> None:
        current = self.runner.current
        if current is not None and current.active:
            raise BusyError("a LoRA is training; caption after it finishes")

    def preview(self, folder: Path, name: str, threshold: float, trigger: str) -> str:
        self.refuse_while_training()
        sources = self.current_sources()
        with self.runner.host.exclusive("LoRA captioning"):
            model = self.captioner(name, threshold, sources)
            lines = preview_captions(folder, model, CaptionOptions(trigger=trigger or None), PREVIEW_COUNT)
        return "\n".join(f"{image}: {caption}" for image, caption in lines.items()) or "No readable images."

    def caption(self, folder: Path, name: str, threshold: float, trigger: str, overwrite: bool,
                on_progress: Callable[[int, int], None]) -> str:
        """Caption the folder with ``name``; refuses while a LoRA trains (they share the GPU)."""
        self.refuse_while_training()
        self.stop.clear()
        sources = self.current_sources()
        with self.runner.host.exclusive("LoRA captioning"):  # the WebUI's queue: no txt2img or training beside it
            model = self.captioner(name, threshold, sources)
            report = caption_images(folder, model, CaptionOptions(trigger=trigger or None),
                                    mode=caption_store.detect_mode(folder), overwrite=overwrite, progress=False,
                                    on_progress=on_progress, should_stop=self.stop.is_set)
        text = f"Captioned {len(report.written)} image(s), kept {len(report.kept)}."
        if report.stopped:
            text = f"Stopped. {text}"
        failure = report.failure_message()
        return f"{text}\n{failure}" if failure else text


def wire(controls: CaptionControls, run: CaptionRun, folder: Any, trigger: Any, outputs: list[Any],
         view: Callable[[str], tuple], setting: str,
         downloads_setting: str = DOWNLOADS_SETTING) -> tuple[Callable[..., tuple], list[Any]]:
    """Connect the controls: ``outputs`` are the dataset view's components plus the status line, ``view`` fills
    them for a folder, ``setting`` names where the tab's CoCa weights path is set. Returns the caption handler and
    its inputs but the last (replace existing), for other buttons that caption (the dataset check's fix)."""
    unchanged = (gr.update(),) * (len(outputs) - 1)

    def failed(name: str, exc: Exception) -> str:
        if isinstance(exc, WeightsMissingError):
            return f"⚠️ {missing_text(name, exc, run.current_sources(), setting, downloads_setting)}"
        if isinstance(exc, CaptionerError):  # e.g. the WebUI's BLIP offline without its weights: say what else works
            return f"⚠️ {exc}\n{choices.needs_line(run.current_sources())}"
        return f"⚠️ Captioning failed: {exc}"

    def caption(folder: str, trigger: str, name: str, threshold: float, overwrite: bool,
                progress: gr.Progress = gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's progress bar; a
        # first-use weight download (the hub's tqdm) shows in it too
        try:
            path = run.runner.policy.check_input(folder, "train_data_dir")
            message = run.caption(path, name, threshold, trigger, overwrite,
                                  lambda done, total: progress((done, total), desc="Captioning", unit="images"))
            return (*view(str(path)), message)
        except Exception as exc:  # noqa: BLE001 - missing weights, bad images: show, don't crash the tab
            return (*unchanged, failed(name, exc))

    def preview(folder: str, trigger: str, name: str, threshold: float,
                progress: gr.Progress = gr.Progress(track_tqdm=True)):  # noqa: B008 - download progress, as above
        try:
            path = run.runner.policy.check_input(folder, "train_data_dir")
            return run.preview(path, name, threshold, trigger), ""
        except Exception as exc:  # noqa: BLE001 - as above
            return "", failed(name, exc)

    inputs = [folder, trigger, controls.captioner, controls.threshold]
    controls.caption_button.click(caption, [*inputs, controls.replace], outputs)
    controls.preview_button.click(preview, inputs, [controls.preview, outputs[-1]])
    controls.stop_button.click(run.stop.set, [], [], queue=False)
    return caption, inputs
