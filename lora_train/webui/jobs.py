"""One training job at a time, in a background thread, shared by the tab and the REST API.

The UI and the API never call the trainer directly: they ``submit`` a config and poll the ``Job`` (a plain
state object). Whoever holds the model is a ``TrainHost``: the WebUI's adapter holds its GPU queue lock and
mirrors progress into ``shared.state``; the standalone UI loads a diffusers bundle. Everything that can be
checked before the thread starts (config, paths, a loaded model) is checked in ``submit``, so a bad request
fails at once with a message and nothing starts.
"""

from __future__ import annotations

import functools
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lora_train.engine import preflight
from lora_train.engine.config.settings import ConfigError, TrainConfig
from lora_train.engine.data import doctor
from lora_train.engine.data.dataset import DatasetError
from lora_train.engine.files import atomic_write
from lora_train.engine.model import ModelBundle
from lora_train.engine.train.progress import StepInfo, TrainCallbacks, TrainResult
from lora_train.engine.train.samples import SampleFn
from lora_train.engine.train.trainer import train
from lora_train.hosts.clip_tokenizer import caption_tokenizer
from lora_train.webui.paths import PathPolicy
from lora_train.webui.presets import preset_values
from lora_train.webui.run_config import prepare_config

PREFERRED_WEIGHT = 0.7
MAX_KEPT_JOBS = 20
_LOG_LINES = 500


class HostError(RuntimeError):
    """The host cannot train now (no model loaded, a family we cannot train); the message says what to do."""


class BusyError(RuntimeError):
    """A job is already running; only one trains at a time."""


class TrainHost:
    """What a job needs from whoever holds the model. Subclasses override ``session`` and what they have."""

    in_webui = False

    def family(self) -> str | None:
        """The loaded model's family ("sd1", "sd2", "sdxl") for presets, or None when unknown."""
        return None

    def generation_notes(self) -> dict[str, str]:
        """Per config key, what an unset value means on this host right now (shown in the tab by the field)."""
        return {}

    def device_type(self) -> str:
        """The torch device type training would run on ("cuda", "cpu", ...); presets depend on it."""
        from lora_train.engine.devices import pick_device

        return pick_device("auto").type

    def preset(self, name: str) -> dict[str, Any]:
        """Preset ``name`` for the model and device this host trains (ValueError naming an unknown preset)."""
        return preset_values(name, self.family(), self.device_type())

    @contextmanager
    def exclusive(self, what: str, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Hold the GPU for other work than training (captioning), so it never runs beside a job or a generation.
        ``on_wait`` is called first when that means waiting."""
        yield

    def check(self, cfg: TrainConfig) -> None:
        """Raise HostError/ConfigError when ``cfg`` cannot be trained now (called before the thread starts)."""

    @contextmanager
    def session(self, cfg: TrainConfig, job: Job) -> Iterator[tuple[ModelBundle, SampleFn | None]]:
        """Hold what training needs (GPU lock, model) for the duration and yield (bundle, sample_fn)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def report(self, job: Job) -> None:
        """Mirror progress somewhere else (the WebUI's progress bar)."""

    def interrupted(self) -> bool:
        """True when the host asks to stop (the WebUI's Interrupt button)."""
        return False

    def list_output(self, job: Job) -> None:
        """Make the published LoRA ``job.output`` visible where the host lists LoRAs (the WebUI's Lora list).

        Called inside ``session`` (the GPU lock still held) and before the job says done, so "done" means the file,
        its card and its listing are all in place for whoever looks next.
        """

    @contextmanager
    def grid_session(self, spec: Any, log: Callable[[str], None]) -> Iterator[Any]:
        """Hold the model for a grid (``grid_jobs``) and yield a ``grid.Renderer``; the model is as before after."""
        raise HostError("this host cannot render grids")
        yield  # pragma: no cover


@dataclass
class Job:
    """Live state of one run; the UI and the API read it, only the worker thread writes it."""

    id: str
    cfg: TrainConfig
    output_root: Path = Path(".")
    state: str = "queued"  # queued, waiting, running, done, stopped, failed
    step: int = 0
    total: int = 0
    loss: float | None = None
    it_per_s: float = 0.0
    eta_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    log: list[str] = field(default_factory=list)
    sample: Image.Image | None = None
    sample_step: int = 0
    output: Path | None = None
    preview: Path | None = None
    error: str | None = None
    error_key: str | None = None
    created: float = field(default_factory=time.time)
    finished_at: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    done_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ("queued", "waiting", "running")

    @property
    def name(self) -> str:
        return self.output.stem if self.output else self.cfg.output_name

    @property
    def snippet(self) -> str:
        """What to paste into a prompt: ``<lora:name:0.7> trigger``."""
        text = f"<lora:{self.name}:{PREFERRED_WEIGHT}>"
        return f"{text} {self.cfg.trigger_word}" if self.cfg.trigger_word else text

    @property
    def best_validation(self) -> tuple[int, float] | None:
        """(step, loss) of the lowest validation loss so far."""
        return min(self.validation, key=lambda p: p[1]) if self.validation else None

    def add_log(self, message: str) -> None:
        self.log.append(f"[{time.strftime('%H:%M:%S')}] {message}")
        del self.log[:-_LOG_LINES]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready status (the REST API's job resource)."""
        return {
            "id": self.id,
            "state": self.state,
            "step": self.step,
            "total": self.total,
            "loss": self.loss,
            "it_per_s": round(self.it_per_s, 3),
            "eta_s": round(self.eta_s, 1),
            "name": self.name,
            "output": str(self.output) if self.output else None,
            "preview": str(self.preview) if self.preview else None,
            "snippet": self.snippet if self.output else None,
            "error": self.error,
            "error_field": self.error_key,
            "log": self.log[-20:],
            "losses": [list(p) for p in self.losses],
            "validation": self._validation_dict(),
        }

    def _validation_dict(self) -> dict[str, Any]:
        best = self.best_validation
        return {"enabled": bool(self.cfg.validation_split), "points": [list(p) for p in self.validation],
                "best_step": best[0] if best else None, "best_loss": best[1] if best else None}


class _JobCallbacks(TrainCallbacks):
    def __init__(self, job: Job, host: TrainHost):
        self.job, self.host = job, host

    def on_start(self, total_steps: int, start_step: int) -> None:
        self.job.total, self.job.step, self.job.state = total_steps, start_step, "running"
        self.job.add_log(f"training {total_steps} steps")
        self.host.report(self.job)

    def on_step(self, info: StepInfo) -> None:
        job = self.job
        job.step, job.total = info.step, info.total_steps
        job.it_per_s, job.eta_s = info.it_per_s, info.eta_s
        if info.loss is not None:  # read every log_every_n_steps only
            job.loss = info.loss
            job.losses.append((info.step, info.loss))
        self.host.report(job)

    def on_sample(self, step: int, images: list[Image.Image]) -> None:
        if images:
            self.job.sample, self.job.sample_step = images[0], step
            self.job.add_log(f"sample at step {step}")

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.job.add_log(f"checkpoint: {path}")

    def on_validation(self, step: int, loss: float, best_step: int) -> None:
        self.job.validation.append((step, loss))
        self.job.add_log(f"validation loss {loss:.4f} at step {step} (best at step {best_step})")

    def on_log(self, message: str) -> None:
        self.job.add_log(message)

    def should_stop(self) -> bool:
        return self.job.stop_event.is_set() or self.host.interrupted()


def remember(jobs: dict[str, Any], job_id: str, job: Any) -> None:
    """Add a job (training or grid) and forget the oldest past ``MAX_KEPT_JOBS``: a long WebUI session must not
    keep every finished job's log."""
    jobs[job_id] = job
    for old in list(jobs)[:-MAX_KEPT_JOBS]:
        del jobs[old]


def describe_run(cfg: TrainConfig, result: TrainResult, model_name: str) -> str:
    """The sidecar's description: what was trained, on what, how far (rank, alpha and lr as the run used them)."""
    facts = result.facts
    loss = f"; final loss {result.loss_history[-1]:.4f}" if result.loss_history else ""
    if result.validation:
        best_step, best_loss = min(result.validation, key=lambda p: p[1])
        loss += f"; validation loss best at step {best_step} ({best_loss:.4f})"
    state = "stopped early at" if result.stopped else "trained"
    return (f"LoRA {state} {result.steps}/{result.total_steps} steps on {model_name or 'the loaded model'} "
            f"from {Path(cfg.train_data_dir).name}: rank {facts.rank}, alpha {facts.alpha:g}, "
            f"lr {facts.unet_lr:g}, resolution {cfg.resolution}{loss}. Made with sd-webui-lora-train.")


def publish(job: Job, result: TrainResult, family: str, model_name: str) -> Path | None:
    """Write the card (``.json``) and preview beside the final file the trainer wrote into the Lora folder."""
    from lora_train.engine.output.export import write_sidecar

    if result.output is None:
        return None
    target = Path(result.output)
    write_sidecar(target, family, job.cfg.trigger_word, describe_run(job.cfg, result, model_name), PREFERRED_WEIGHT)
    if job.sample is not None:
        image = job.sample
        job.preview = atomic_write(target.with_suffix(".preview.png"), lambda tmp: image.save(tmp, format="PNG"))
    return target


class JobRunner:
    """Starts jobs one at a time on a thread; keeps the last few for status queries."""

    def __init__(self, host: TrainHost, policy: PathPolicy | Callable[[], PathPolicy]):
        self.host = host
        self._policy = policy
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    @functools.cached_property
    def grids(self) -> Any:
        """The grid jobs (``grid_jobs.GridRunner``) over the same host, paths and one-thing-at-a-time rule."""
        from lora_train.webui.grid_jobs import GridRunner

        return GridRunner(self)

    @property
    def policy(self) -> PathPolicy:
        """The path rules now (the WebUI's are read from its settings at each use, so edits apply at once)."""
        return self._policy if isinstance(self._policy, PathPolicy) else self._policy()

    @property
    def current(self) -> Job | None:
        """The running job, else the most recent one."""
        with self._lock:
            jobs = list(self.jobs.values())
        active = [j for j in jobs if j.active]
        return active[-1] if active else (jobs[-1] if jobs else None)

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def submit(self, data: dict[str, Any] | TrainConfig) -> Job:
        """Validate and start a job; raises ConfigError (with .key), HostError or BusyError and starts nothing."""
        policy = self.policy
        cfg = prepare_config(data, policy)
        if cfg.multi_gpu:
            raise ConfigError("multi_gpu", "the tab and the API train on one GPU; train on several with the CLI "
                                           "(README, More than one GPU)")
        self.host.check(cfg)
        reports: list[doctor.Report] = []
        try:  # the dataset doctor's errors stop it here, with the sentences the tab and the API show
            preflight.check(cfg, self.host.family(), caption_tokenizer(), on_report=reports.append)
        except DatasetError as exc:  # every bad image at once, reported on the dataset field
            raise ConfigError("train_data_dir", str(exc)) from None
        with self._lock:
            if any(j.active for j in self.jobs.values()):
                raise BusyError("a LoRA is already training; wait for it or press Stop")
            if self.grids.active is not None:
                raise BusyError("a grid is being made; wait for it or press Stop")
            job = Job(id=uuid.uuid4().hex[:12], cfg=cfg, output_root=policy.output_root)
            for report in reports:
                job.add_log(report.summary())
            remember(self.jobs, job.id, job)
        threading.Thread(target=self._run, args=(job,), name=f"lora-train-{job.id}", daemon=True).start()
        return job

    def stop(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            return False
        job.stop_event.set()
        if job.active:
            job.add_log("stop requested; saving after the current step")
        return True

    def _run(self, job: Job) -> None:
        job.add_log(f"job {job.id}: {job.cfg.output_name} from {job.cfg.train_data_dir}")
        try:
            job.state = "waiting"
            with self.host.session(job.cfg, job) as (bundle, sample_fn):
                job.state = "running"
                result = train(job.cfg, bundle, _JobCallbacks(job, self.host), sample_fn, final_dir=job.output_root)
                job.output = publish(job, result, bundle.family, bundle.model_name)
                if job.output is not None:
                    self.host.list_output(job)
            job.state = "stopped" if result.stopped else "done"
            job.add_log(f"{job.state}: {result.steps}/{result.total_steps} steps -> {job.output}")
        except Exception as exc:  # noqa: BLE001 - every failure must reach the UI, not die with the thread
            job.state = "failed"
            job.error = str(exc)
            job.error_key = getattr(exc, "key", None)
            job.add_log(f"failed: {exc}")
            traceback.print_exc()
        finally:
            job.finished_at = time.time()
            job.done_event.set()
