"""Resumable training state in ``<name>-state/``, saved so that a crash at any moment keeps the last good one.

Each save writes step-named files (adapter, optimizer, scheduler, scaler) next to the previous ones, then
replaces ``state.json``, which names the files it belongs to, in one atomic rename; only then are the files
of older saves removed. A reader therefore always finds a state.json whose files are complete and from the
same step. The RNG needs no saving: every draw of step k is seeded from (seed, k). A run on N processes
(torchrun) records N: its steps are global batches of ``batch_size x N``, so it resumes on N processes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_train.engine.config.settings import ConfigError
from lora_train.engine.files import atomic_write, atomic_write_text

STATE_JSON = "state.json"
# the .safetensors-state extension keeps a state folder inside models/Lora from showing up as a Lora card
_PARTS = {"adapter": ".safetensors-state", "optimizer": ".pt", "scheduler": ".pt", "scaler": ".pt"}
_PART_FILE = re.compile(r"(adapter|optimizer|scheduler|scaler)(-\d{8})?\.(safetensors-state|pt)")
# states written before saves were crash-safe: fixed names, replaced one by one
_LEGACY_FILES = {part: f"{part}{suffix}" for part, suffix in _PARTS.items()}


@dataclass
class ResumeState:
    """What state.json says: the step reached, the run's name, and whether that run had finished."""

    folder: Path
    step: int
    output_name: str
    finished: bool = False
    loss_history: list[float] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    processes: int = 1

    def path(self, part: str) -> Path:
        return self.folder / self.files[part]


def read(folder: str | Path, processes: int = 1) -> ResumeState:
    """The state saved in ``folder``; one clear error when it is not a state folder, or when it was trained on
    another number of processes than the ``processes`` resuming it."""
    folder = Path(folder)
    info_path = folder / STATE_JSON
    if not info_path.is_file():
        raise ConfigError("resume", f"{folder} has no {STATE_JSON}; point it at a '<name>-state' folder")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        state = ResumeState(folder, int(info["step"]), str(info["output_name"]), bool(info.get("finished", False)),
                            [float(v) for v in info.get("loss_history", [])], dict(info.get("files", _LEGACY_FILES)),
                            int(info.get("processes", 1)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("resume", f"{info_path} is not a state this version wrote ({exc!r}); "
                                    "train from the LoRA file with network_weights instead") from None
    missing = [name for name in state.files.values() if not (folder / name).is_file()]
    missing += sorted(set(_PARTS) - set(state.files))
    if missing:
        raise ConfigError("resume", f"{folder} is incomplete: {', '.join(missing)} missing")
    if state.processes != processes:
        how = (f"torchrun --nproc_per_node {state.processes} -m lora_train train ..." if state.processes > 1
               else "one process: python -m lora_train train ...")
        raise ConfigError("resume", f"{folder} was trained on {state.processes} process(es) and this run has "
                                    f"{processes}; a step is a batch of batch_size x processes, so resume it on "
                                    f"{how} (or start over from the LoRA with network_weights)")
    return state


def save(folder: Path, step: int, output_name: str, finished: bool, loss_history: list[float],
         adapter: dict[str, torch.Tensor], optimizer, scheduler, scaler, processes: int = 1) -> Path:
    """Write a complete state for ``step``; the previous one stays valid until state.json is replaced."""
    files = {part: f"{part}-{step:08d}{suffix}" for part, suffix in _PARTS.items()}
    atomic_write(folder / files["adapter"], lambda tmp: save_file(adapter, str(tmp)))
    for part, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        atomic_write(folder / files[part], lambda tmp, obj=obj: torch.save(obj.state_dict(), tmp))
    info = {"step": step, "output_name": output_name, "finished": finished, "loss_history": loss_history,
            "files": files, "processes": processes}
    atomic_write_text(folder / STATE_JSON, json.dumps(info))
    _remove_stale(folder, set(files.values()))
    return folder


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Files of older saves (and temp files of interrupted ones); runs only after state.json points elsewhere."""
    for entry in folder.iterdir():
        stale = _PART_FILE.fullmatch(entry.name) or (entry.name.startswith(".") and entry.name.endswith(".tmp"))
        if stale and entry.name not in keep:
            entry.unlink(missing_ok=True)


def load(state: ResumeState, optimizer, scheduler, scaler, device: torch.device) -> dict[str, torch.Tensor]:
    """Restore optimizer, scheduler and scaler in place; return the adapter tensors for lora.load_kohya."""
    optimizer.load_state_dict(torch.load(state.path("optimizer"), map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(state.path("scheduler"), weights_only=True))
    scaler.load_state_dict(torch.load(state.path("scaler"), weights_only=True))
    return load_file(str(state.path("adapter")))
