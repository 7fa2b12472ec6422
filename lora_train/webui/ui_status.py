"""The tab's live training view: status line, ETA, loss plot, sample and log, following the current job.

The view follows the current job by itself (``follow_job``): a ``gr.Timer`` where gradio has one, an async
generator started by the page's load event on gradio 3 (it waits in the event loop, not in a worker thread).
A poll re-sends only what changed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from lora_train.webui.jobs import Job, JobRunner
from lora_train.webui.ui_gradio import accepted

POLL_SECONDS = 1.0
LONG_RUN_S = 3600.0


def loss_frame(job: Job | None) -> pd.DataFrame:
    """Training and validation loss as one long table (``series`` colours the two lines)."""
    points = [(s, v, "training") for s, v in job.losses if v is not None] if job else []
    points += [(s, v, "validation") for s, v in job.validation] if job else []
    return pd.DataFrame({"step": [p[0] for p in points], "loss": [p[1] for p in points],
                         "series": [p[2] for p in points]})


VALIDATION_OFF = ("Validation is off. To see whether the LoRA still learns or already overfits, set **Validation "
                  "split** (e.g. 0.1) under Advanced > Validation: those images are held out, never trained on, and "
                  "validated at fixed noise so the curve is comparable.")


def validation_text(job: Job | None) -> str:
    """Under the plot: the best validation point, or how to turn validation on."""
    if job is None or not job.cfg.validation_split:
        return VALIDATION_OFF
    best = job.best_validation
    if best is None:
        return f"Validation: {job.cfg.validation_split:g} of the images held out; the first point comes at the " \
               "end of an epoch (or every `validate_every_n_steps`)."
    last_step, last = job.validation[-1]
    trend = " · rising since the best: it may be overfitting" if last_step != best[0] and last > best[1] else ""
    return f"Validation loss **best at step {best[0]}** ({best[1]:.4f}); at step {last_step}: {last:.4f}{trend}"


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
    validation: int
    sample_step: int
    log_tail: str


def live_updates(job: Job | None, sent: Sent | None, device: str) -> tuple[list[Any], Sent]:
    """Updates for (progress, loss plot, validation line, sample, log, result group, output path, snippet) and
    what they show.

    ``sent`` None means the page shows nothing yet (just loaded): everything is sent.
    """
    now = Sent(job.id if job else None, job.state if job else "", len(job.losses) if job else 0,
               len(job.validation) if job else 0, job.sample_step if job else 0,
               job.log[-1] if job and job.log else "")
    fresh = sent is None or sent.job != now.job
    done = job is not None and not job.active and job.output is not None

    def changed(*fields: str) -> bool:
        return fresh or any(getattr(sent, f) != getattr(now, f) for f in fields)

    keep = gr.update()
    updates = [
        progress_text(job, device),
        loss_frame(job) if changed("points", "validation", "state") else keep,
        validation_text(job) if changed("validation", "state") else keep,
        (job.sample if job else None) if changed("sample_step") else keep,
        "\n".join(job.log[-200:]) if job and changed("log_tail") else ("" if fresh else keep),
        gr.update(visible=done) if changed("state") else keep,
        (str(job.output) if done else "") if changed("state") else keep,
        (job.snippet if done else "") if changed("state") else keep,
    ]
    return updates, now


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
    demo.load(watch, [], outputs, **accepted(demo.load, {"show_progress": "hidden", "concurrency_limit": None}))
