"""The tab's Grid panel: pick a LoRA with saved steps, make its epoch x strength grid, click a cell to set the
card's preferred weight (and, if wanted, keep that step's file as the final one).

The grid is made by ``grid_jobs`` on the host (the WebUI's txt2img); this panel only starts it, follows it and
turns a click on the picture into a (row, column) with the grid's own layout.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr

from lora_train.engine.output import grid
from lora_train.webui.grid_jobs import GridJob, choose
from lora_train.webui.jobs import BusyError, ConfigError, JobRunner
from lora_train.webui.ui_gradio import make

POLL_SECONDS = 1.0


def loras_with_steps(runner: JobRunner) -> list[str]:
    """File names in the output folder that have saved steps beside them or in the run folder."""
    policy = runner.policy
    folder = policy.output_root
    if not folder.is_dir():
        return []
    return [path.name for path in sorted(folder.glob("*.safetensors"))
            if grid.saved_step_files(path, [policy.run_root])]


def grid_status(job: GridJob | None) -> str:
    if job is None:
        return "No grid yet. Train with **Save every N epochs** (or steps), then make the grid of the result."
    head = f"Grid of **{job.lora.name}**: {job.done}/{job.total} images"
    if job.state == "failed":
        return f"**Grid failed**: {job.error}"
    if job.active:
        return f"{head}…"
    if job.state == "stopped":
        return f"{head} — stopped; press **Make grid** again to continue where it stopped."
    return (f"{head} in {job.seconds:.1f} s. Saved `{job.images[0]}` (with its infotext). Click a cell to make its "
            "strength the LoRA's preferred weight.") if job.images else head


def _strengths(text: str) -> list[float]:
    try:
        return [float(v) for v in str(text or "").replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ConfigError("strengths", f"{text!r} is not a comma-separated list of numbers") from None


def grid_panel(runner: JobRunner) -> dict[str, Any]:
    """Build the panel inside the current Blocks context; returns its components by name (tests use them)."""
    grids = runner.grids
    parts: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                parts["lora"] = make(gr.Dropdown, label="LoRA (with saved steps)", choices=loras_with_steps(runner),
                                     allow_custom_value=True, elem_id="lora_train_grid_lora", scale=4)
                parts["refresh"] = make(gr.Button, value="🔄", elem_id="lora_train_grid_refresh", scale=1)
            parts["prompts"] = make(gr.Textbox, label="Prompts (one per line)", lines=2,
                                    placeholder="default: the trigger word, and a caption the LoRA never trained on",
                                    elem_id="lora_train_grid_prompts")
            parts["strengths"] = make(gr.Textbox, label="Strengths (a plain column is always added)",
                                      value=", ".join(f"{w:g}" for w in grid.DEFAULT_STRENGTHS),
                                      elem_id="lora_train_grid_strengths")
            parts["negative"] = make(gr.Textbox, label="Negative prompt", elem_id="lora_train_grid_negative")
            with gr.Row():
                parts["seed"] = make(gr.Number, label="Seed (-1: the run's)", value=-1, precision=0,
                                     elem_id="lora_train_grid_seed")
                parts["steps"] = make(gr.Number, label="Steps", value=20, precision=0, elem_id="lora_train_grid_steps")
                parts["cfg_scale"] = make(gr.Number, label="CFG scale", value=7.0, elem_id="lora_train_grid_cfg")
                parts["size"] = make(gr.Number, label="Size (0: training resolution)", value=0, precision=0,
                                     elem_id="lora_train_grid_size")
            with gr.Row():
                parts["make"] = make(gr.Button, value="Make grid", variant="primary", elem_id="lora_train_grid_make")
                parts["stop"] = make(gr.Button, value="Stop grid", elem_id="lora_train_grid_stop")
            parts["status"] = make(gr.Markdown, value=grid_status(grids.current), elem_id="lora_train_grid_status")
        with gr.Column(scale=3):
            # no label badge: it would cover the grid's own title line (the prompt); rows and columns name themselves
            parts["image"] = make(gr.Image, label="Grid: rows are saved steps, columns strengths (click a cell)",
                                  show_label=False, interactive=False, type="filepath", elem_id="lora_train_grid_image")
            parts["choice"] = make(gr.Markdown, value="", elem_id="lora_train_grid_choice")
            parts["keep"] = make(gr.Button, value="Keep this step's file as the final LoRA", visible=False,
                                 elem_id="lora_train_grid_keep")
    chosen = gr.State(None)

    def refresh():
        return gr.update(choices=loras_with_steps(runner))

    parts["refresh"].click(refresh, [], [parts["lora"]])

    def start(lora, prompts, strengths, negative, seed, steps, cfg_scale, size):
        request = {"lora": lora, "prompts": [p.strip() for p in str(prompts or "").splitlines() if p.strip()],
                   "negative": negative or "", "steps": int(steps or 20), "cfg_scale": float(cfg_scale or 7.0)}
        if seed is not None and int(seed) >= 0:
            request["seed"] = int(seed)
        if size:
            request["width"] = request["height"] = int(size)
        try:
            request["strengths"] = _strengths(strengths)
            job = grids.submit(request)
        except (ConfigError, BusyError, ValueError) as exc:
            yield f"⚠️ {exc}", gr.update()
            return
        while job.active:
            yield grid_status(job), gr.update()
            time.sleep(POLL_SECONDS)
        yield grid_status(job), (str(job.images[0]) if job.images else None)

    fields = [parts[k] for k in ("lora", "prompts", "strengths", "negative", "seed", "steps", "cfg_scale", "size")]
    parts["make"].click(start, fields, [parts["status"], parts["image"]])

    def stop():
        job = grids.active
        if job is None:
            return "No grid is being made."
        grids.stop(job.id)
        return "Stopping after the current image; **Make grid** again continues from there."

    parts["stop"].click(stop, [], [parts["status"]], queue=False)

    def click(evt: gr.SelectData):
        job = grids.current
        if job is None or job.active or not job.images:
            return "Make a grid first.", gr.update(visible=False), None
        x, y = evt.index
        cell = grid.layout(job.spec).cell_at(x, y)
        if cell is None:
            return "Click an image, not a label.", gr.update(visible=False), None
        try:
            choice = choose(job, *cell, keep_step=False, backup_dir=runner.policy.run_root)
        except ValueError as exc:
            return f"⚠️ {exc}", gr.update(visible=False), None
        offer = Path(choice.row.path).resolve() != job.lora.resolve()
        return choice.message(), gr.update(visible=offer, value=f"Keep {choice.row.label} as the final LoRA"), cell

    parts["image"].select(click, [], [parts["choice"], parts["keep"], chosen])

    def keep(cell):
        job = grids.current
        if job is None or cell is None:
            return "Click a cell first.", gr.update(visible=False)
        choice = choose(job, *cell, keep_step=True, backup_dir=runner.policy.run_root)
        runner.host.finished(job)  # the WebUI rescans models/Lora: the file under that name changed
        return choice.message(), gr.update(visible=False)

    parts["keep"].click(keep, [chosen], [parts["choice"], parts["keep"]])
    return parts
