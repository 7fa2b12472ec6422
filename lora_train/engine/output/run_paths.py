"""Where one training run writes, reserved as a whole: final LoRA, resumable state, step files, samples.

Names are chosen for all artifacts together: ``name`` is taken when ANY of them exists, so a rerun after a
crash picks ``name-2`` instead of overwriting the crashed run's state and step files. The final file may live
in another folder than the rest (the WebUI puts it in models/Lora and the rest in a run folder, because the
Lora list shows every .safetensors there as a card).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_train.engine.config.settings import ConfigError
from lora_train.engine.files import first_free
from lora_train.engine.train.run_state import ResumeState


@dataclass(frozen=True)
class RunPaths:
    """Every path a run named ``name`` writes. Build with ``plan_run`` (new or resumed run) or ``RunPaths.of``."""

    final_dir: Path
    work_dir: Path
    name: str

    @classmethod
    def of(cls, final_dir: str | Path, work_dir: str | Path, name: str) -> RunPaths:
        """The paths of run ``name`` whether or not they exist (a resumed run continues under its own name)."""
        return cls(Path(final_dir), Path(work_dir), name)

    @property
    def final(self) -> Path:
        return self.final_dir / f"{self.name}.safetensors"

    @property
    def state(self) -> Path:
        return self.work_dir / f"{self.name}-state"

    @property
    def samples(self) -> Path:
        """Sample images of every run in this work folder, told apart by the ``<name>_`` prefix (kohya's layout)."""
        return self.work_dir / "sample"

    def step_file(self, step: int) -> Path:
        return self.work_dir / f"{self.name}-step{step:08d}.safetensors"

    def sample_file(self, step: int, index: int) -> Path:
        return self.samples / f"{self.name}_{step:06d}_{index:02d}.png"

    def taken(self) -> bool:
        """True when any artifact of this name exists (the latent cache is shared and does not count)."""
        if self.final.exists() or self.state.exists():
            return True
        steps = re.compile(rf"{re.escape(self.name)}-step\d{{8}}\.safetensors")
        samples = re.compile(rf"{re.escape(self.name)}_\d{{6}}_\d{{2}}\.png")
        return _any_match(self.work_dir, steps) or _any_match(self.samples, samples)

    def check_writable(self) -> None:
        """Both output folders exist and take a file, before any training work (see ``check_writable``)."""
        for folder in dict.fromkeys((self.final_dir, self.work_dir)):
            check_writable(folder, "output_dir")


def check_writable(folder: Path, key: str) -> None:
    """Create ``folder`` and write + remove a probe file in it.

    Raises ConfigError(key) naming the folder, so a read-only or missing drive fails in a second instead of
    after hours of training.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(key, f"cannot write to {folder} ({exc.strerror or exc}); pick a folder you can write to") \
            from None


def _any_match(folder: Path, pattern: re.Pattern[str]) -> bool:
    try:
        return any(pattern.fullmatch(entry.name) for entry in os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return False


def reserve_run(final_dir: str | Path, work_dir: str | Path, name: str, overwrite: bool = False) -> RunPaths:
    """The paths for a new run: ``name``, or the first ``name-N`` none of whose artifacts exist yet.

    With ``overwrite`` the name is used as is and its files are replaced as the new run writes them.
    """
    if overwrite:
        return RunPaths.of(final_dir, work_dir, name)
    return RunPaths.of(final_dir, work_dir, first_free(name, lambda n: RunPaths.of(final_dir, work_dir, n).taken()))


def plan_run(final_dir: str | Path, work_dir: str | Path, name: str, overwrite: bool = False,
             resumed: ResumeState | None = None) -> RunPaths:
    """Where a run writes: the one place output names are decided (the trainer and the WebUI jobs ask here).

    A new run reserves a free name; a resumed one keeps its own name, unless that would replace a finished file.
    """
    if resumed is None:
        return reserve_run(final_dir, work_dir, name, overwrite)
    same = RunPaths.of(final_dir, work_dir, resumed.output_name)
    if resumed.finished and same.final.exists() and not overwrite:
        return reserve_run(final_dir, work_dir, resumed.output_name)
    return same
