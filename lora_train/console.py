"""The terminal's view of a training run (``train`` and the LLM loop): a tqdm bar and a two-stage Ctrl-C."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from lora_train.engine.train.progress import StepInfo, TrainCallbacks


class ConsoleCallbacks(TrainCallbacks):
    """tqdm progress; the first Ctrl-C stops cleanly after the current step and saves, a second one aborts.

    ``quiet``: only hear the stop request (the other processes of a multi-GPU run; rank 0 shows the progress).
    """

    def __init__(self, quiet: bool = False) -> None:
        self.bar: tqdm | None = None
        self.stop_requested = False
        self.quiet = quiet

    def on_start(self, total_steps: int, start_step: int) -> None:
        if self.quiet:
            return
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def on_step(self, info: StepInfo) -> None:
        if self.quiet:
            return
        assert self.bar is not None
        self.bar.update(info.step - self.bar.n)
        if info.loss is not None:  # read every log_every_n_steps only
            self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", epoch=info.epoch)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.on_log(f"checkpoint: {path}")

    def on_validation(self, step: int, loss: float, best_step: int) -> None:
        tqdm.write(f"validation loss at step {step}: {loss:.4f} (best at step {best_step})")

    def on_log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message)

    def should_stop(self) -> bool:
        return self.stop_requested

    def request_stop(self, *_: object) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.on_log("stopping after this step (Ctrl-C again to abort without saving)")
