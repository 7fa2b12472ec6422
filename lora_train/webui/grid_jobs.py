"""Grid jobs for the tab and the API: one at a time, never beside a training job, stoppable and resumable.

A request names a LoRA (a file in the Lora folder or the run folder: the same path policy as training) and
optionally prompts, strengths, seed, negative prompt, steps, CFG and size; ``grid_plan`` fills in the rest. The
host renders (``TrainHost.grid_session``: the WebUI's txt2img, or the standalone UI's diffusers model). Stop keeps
every finished cell; the same request again continues from there. Choosing a cell writes the card's preferred
weight, and may keep that step's file as the final one.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_train.engine.output import card, grid
from lora_train.engine.output.grid_plan import GridError, plan_grid
from lora_train.webui.paths import PathNotAllowed, resolve

if TYPE_CHECKING:
    from lora_train.webui.jobs import JobRunner

_FIELDS = ("prompts", "strengths", "negative", "seed", "steps", "cfg_scale", "width", "height", "sampler")


@dataclass
class GridJob:
    """Live state of one grid; the tab and the API read it, only the worker thread writes it."""

    id: str
    lora: Path
    spec: grid.GridSpec
    folder: Path
    state: str = "queued"  # queued, running, done, stopped, failed
    done: int = 0
    total: int = 0
    images: list[Path] = field(default_factory=list)
    error: str | None = None
    log: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    done_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def add_log(self, message: str) -> None:
        self.log.append(f"[{time.strftime('%H:%M:%S')}] {message}")
        del self.log[:-200]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "lora": str(self.lora), "done": self.done, "total": self.total,
            "images": [str(p) for p in self.images], "error": self.error, "seconds": round(self.seconds, 2),
            "rows": [{"label": r.label, "file": r.path, "step": r.step} for r in self.spec.rows],
            "columns": self.spec.columns, "prompts": self.spec.prompts, "seed": self.spec.seed,
            "log": self.log[-20:],
        }


class GridRunner:
    """Starts grid jobs on a thread, sharing the training runner's host, path policy and busy rule."""

    def __init__(self, runner: JobRunner):
        self.runner = runner
        self.jobs: dict[str, GridJob] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> GridJob | None:
        return next((job for job in self.jobs.values() if job.active), None)

    @property
    def current(self) -> GridJob | None:
        return self.active or (list(self.jobs.values())[-1] if self.jobs else None)

    def get(self, job_id: str) -> GridJob | None:
        return self.jobs.get(job_id)

    def lora_path(self, name_or_path: str) -> Path:
        """A LoRA named by file name (in the output folder) or path, inside the policy's output or run folder."""
        from lora_train.webui.jobs import ConfigError

        policy = self.runner.policy
        text = str(name_or_path or "").strip()
        if not text:
            raise ConfigError("lora", "name the LoRA to compare (a file in the Lora folder)")
        path = Path(text)
        if not path.is_absolute() and len(path.parts) == 1:
            path = policy.output_root / (text if text.endswith(".safetensors") else f"{text}.safetensors")
        try:
            return policy.check_output(path, "lora")
        except PathNotAllowed:
            return policy.check_input(path, "lora")

    def plan(self, request: dict[str, Any]) -> tuple[Path, grid.GridSpec, Path]:
        """(LoRA, spec, folder the grid is written to) for a request; ConfigError/GridError naming what is wrong."""
        from lora_train.webui.jobs import ConfigError

        lora = self.lora_path(request.get("lora", ""))
        policy = self.runner.policy
        folders = [policy.run_root] if policy.run_root != lora.parent else []
        cfg = self._config_of(lora)
        options = {key: request[key] for key in _FIELDS if request.get(key) not in (None, "", [])}
        size = (int(options.pop("width", 0) or 0), int(options.pop("height", 0) or 0))
        try:
            spec = plan_grid(lora, folders, cfg=cfg, size=size if all(size) else None, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(getattr(exc, "key", "lora"), str(exc)) from None
        folder = policy.run_root if policy.run_root != policy.output_root else lora.parent
        return lora, spec, folder

    def _config_of(self, lora: Path):
        """The config of the job that trained ``lora`` in this session (its dataset gives a held-out caption)."""
        for job in reversed(list(self.runner.jobs.values())):
            if job.output is not None and resolve(job.output) == resolve(lora):
                return job.cfg
        return None

    def submit(self, request: dict[str, Any]) -> GridJob:
        from lora_train.webui.jobs import BusyError, remember

        lora, spec, folder = self.plan(request)
        with self._lock:
            training = self.runner.current
            if training is not None and training.active:
                raise BusyError("a LoRA is training; make the grid when it is done")
            if self.active is not None:
                raise BusyError("a grid is being made; wait for it or press Stop")
            job = GridJob(uuid.uuid4().hex[:12], lora, spec, folder, total=spec.cell_count())
            remember(self.jobs, job.id, job)
        threading.Thread(target=self._run, args=(job,), name=f"lora-grid-{job.id}", daemon=True).start()
        return job

    def stop(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            return False
        job.stop_event.set()
        return True

    def _run(self, job: GridJob) -> None:
        host = self.runner.host
        job.add_log(f"grid of {job.lora.name}: {len(job.spec.rows)} saved steps x {len(job.spec.columns)} columns "
                    f"x {len(job.spec.prompts)} prompt(s)")
        started = time.perf_counter()
        try:
            with host.grid_session(job.spec, job.add_log) as renderer:
                job.state = "running"

                def progress(done: int, total: int) -> None:
                    job.done, job.total = done, total

                result = grid.render(job.spec, job.folder, renderer,
                                     lambda: job.stop_event.is_set() or host.interrupted(), progress)
            job.images = result.images
            job.state = "stopped" if result.stopped else "done"
            job.add_log(f"{job.state}: {result.rendered} image(s) rendered, {result.reused} reused"
                        + (f" -> {', '.join(str(p) for p in result.images)}" if result.images else
                           "; the same request continues where it stopped"))
        except Exception as exc:  # noqa: BLE001 - every failure must reach the UI, not die with the thread
            job.state, job.error = "failed", str(exc)
            job.add_log(f"failed: {exc}")
            traceback.print_exc()
        finally:
            job.seconds = time.perf_counter() - started
            job.done_event.set()


@dataclass(frozen=True)
class Choice:
    """What a click on a grid cell did."""

    lora: Path
    weight: float
    row: grid.GridRow
    card: Path
    kept: Path | None = None
    backup: Path | None = None

    def message(self) -> str:
        text = f"Preferred weight of **{self.lora.stem}** set to **{self.weight:g}** (card `{self.card.name}`)."
        if self.kept is not None:
            text += f" Its file is now {self.row.label}" + (f"; the previous one is kept in `{self.backup}`."
                                                             if self.backup else ".")
        return text


def choose(job: GridJob, row: int, column: int, keep_step: bool, backup_dir: Path) -> Choice:
    """Apply a click on cell (row, column) of ``job``'s grid: the card's preferred weight, and with ``keep_step``
    that row's file copied over the final one (the replaced file is copied to ``backup_dir`` first)."""
    picked = grid.cell_choice(job.spec, row, column)
    if picked is None:
        raise GridError("pick a cell with a strength (the plain column has no LoRA)")
    chosen_row, weight = picked
    path = card.set_preferred_weight(job.lora, weight)
    kept = backup = None
    if keep_step and Path(chosen_row.path).resolve() != job.lora.resolve():
        backup = card.keep_as_final(Path(chosen_row.path), job.lora, backup_dir)
        kept = job.lora
    return Choice(job.lora, weight, chosen_row, path, kept, backup)
