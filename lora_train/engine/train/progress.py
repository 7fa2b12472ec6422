"""What a training run tells its caller: progress per step, the result, and the errors that end it early.

The CLI, the WebUI jobs and the LLM loop all speak this, so none of them needs the trainer itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lora_train.engine.output import export


@dataclass
class StepInfo:
    """What a progress display needs after each optimizer step.

    ``loss`` is the mean since the last reading, read from the device every ``log_every_n_steps`` only (each
    read waits for the GPU); on the other steps it is None.
    """

    step: int
    total_steps: int
    epoch: int
    loss: float | None
    lr: float
    it_per_s: float
    eta_s: float


class TrainCallbacks:
    """Override what you need; the CLI prints with tqdm, the WebUI tab updates its widgets."""

    def on_start(self, total_steps: int, start_step: int) -> None: ...
    def on_step(self, info: StepInfo) -> None: ...
    def on_sample(self, step: int, images: list[Image.Image]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_validation(self, step: int, loss: float, best_step: int) -> None: ...
    def on_log(self, message: str) -> None: ...
    def should_stop(self) -> bool:
        return False


@dataclass
class TrainResult:
    """``facts`` holds the run's real numbers (rank, alpha, lrs, epochs); ``state`` the folder to resume from;
    ``validation`` every validation loss of the run (empty without ``validation_split``)."""

    output: Path | None
    steps: int
    total_steps: int
    stopped: bool
    loss_history: list[float] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    facts: export.RunFacts | None = None
    state: Path | None = None
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)


class NonFiniteError(RuntimeError):
    """The loss, a latent or the weights became NaN/inf; nothing non-finite was written."""


class OutputWriteError(OSError):
    """The final file could not be written where asked; the message says where the LoRA was saved instead."""
