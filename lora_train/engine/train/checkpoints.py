"""Everything a run writes of its LoRA: step files, resumable state and the final file, never NaN and never lost.

Remembers the last good state, so an error can say where to resume from.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import dataset as data
from lora_train.engine.files import free_path
from lora_train.engine.model import ModelBundle
from lora_train.engine.network import lora
from lora_train.engine.output import export
from lora_train.engine.output.run_paths import RunPaths
from lora_train.engine.train import run_state
from lora_train.engine.train.progress import NonFiniteError, OutputWriteError


class RunWriter:
    """Writes one run's files under ``paths``; ``facts`` must be set before the first export."""

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, dataset: data.Dataset, paths: RunPaths,
                 batches_per_epoch: int, last_good: Path | None = None, processes: int = 1):
        self.cfg, self.bundle, self.dataset, self.paths = cfg, bundle, dataset, paths
        self.batches_per_epoch = batches_per_epoch
        self.last_good = last_good
        self.processes = processes  # recorded in the state: a run resumes on as many processes as it had
        self.started_at = time.time()
        self.facts: export.RunFacts | None = None
        self.validator = None  # the run's Validator, when it holds images out: its keys and curve go in the metadata

    def epochs_at(self, step: int) -> int:
        """Epochs begun by ``step`` (1-based, as kohya's ss_epoch); at total_steps, the epochs the run has."""
        return math.ceil(step * self.cfg.gradient_accumulation_steps / self.batches_per_epoch)

    def adapter(self, network: lora.LoraNetwork, dtype: torch.dtype, step: int) -> dict[str, torch.Tensor]:
        """The adapter weights as kohya tensors; refuses NaN/inf so no file ever holds them."""
        tensors = lora.kohya_state_dict(network, dtype)
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise NonFiniteError(f"the LoRA weights became NaN/inf by step {step}; {self.likely_cause()}. "
                                 f"{self.kept()}")
        return tensors

    def export(self, network: lora.LoraNetwork, path: Path, step: int) -> Path:
        metadata = export.training_metadata(
            self.cfg, self.dataset, self.bundle.family, self.bundle.parameterization, self.bundle.model_name,
            self.facts, step, self.epochs_at(step), self.started_at,
        )
        metadata.update(export.validation_metadata(
            self.cfg, len(self.validator.dataset.items) if self.validator else 0,
            self.validator.history.points if self.validator else []))
        tensors = self.adapter(network, export.SAVE_DTYPES[self.cfg.save_precision], step)
        return export.write_lora(path, tensors, metadata)

    def export_final(self, network: lora.LoraNetwork, step: int) -> Path:
        """The finished LoRA; when its folder refuses the write, it goes to the work folder or the temp folder
        and the error says where, so the trained weights are never lost."""
        try:
            return self.export(network, self.paths.final, step)
        except OSError as exc:
            error = exc
        rescues = [self.paths.work_dir / self.paths.final.name, Path(tempfile.gettempdir()) / self.paths.final.name]
        for rescue in rescues:
            if rescue.parent != self.paths.final_dir:
                try:
                    saved = self.export(network, free_path(rescue), step)
                except OSError:
                    continue
                raise OutputWriteError(f"could not write {self.paths.final} ({error}); "
                                       f"the trained LoRA was saved to {saved} instead") from error
        raise OutputWriteError(f"could not write {self.paths.final} ({error}); {self.kept()}") from error

    def save_state(self, network, optimizer, scheduler, scaler, step: int, history: list[float],
                   finished: bool = False) -> None:
        """Everything resume needs, crash-safe as a whole (see run_state)."""
        adapter = self.adapter(network, torch.float32, step)
        run_state.save(self.paths.state, step, self.paths.name, finished, history, adapter, optimizer, scheduler,
                       scaler, self.processes)
        self.last_good = self.paths.state

    def checkpoint(self, network, optimizer, scheduler, scaler, step: int, history: list[float]) -> Path:
        """A step file plus the state to resume from it; returns the step file."""
        path = self.export(network, self.paths.step_file(step), step)
        self.save_state(network, optimizer, scheduler, scaler, step, history)
        return path

    def likely_cause(self) -> str:
        if self.cfg.mixed_precision == "fp16":
            return "fp16 overflowed: set mixed_precision to bf16 (or no)"
        return f"the learning rate ({self.facts.unet_lr:g}) is probably too high, or an image is broken"

    def kept(self) -> str:
        if self.last_good is None:
            return "No checkpoint was saved before it (set save_every_n_steps to keep some)."
        return f"The last good state is kept in {self.last_good} (resume from it)."
