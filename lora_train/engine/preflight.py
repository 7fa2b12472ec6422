"""Checks that run before a model is loaded or a latent is cached.

Every input a user points at is read just far enough to know it will work (file headers, not tensors), so a bad
one costs seconds and one line instead of a lost run. The CLI calls ``check`` before loading the model; the job
runner calls it with the loaded model's family before starting a job. Diffusers-free (the WebUI path uses it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import torch

from lora_train.engine.config.paths import prompts_file
from lora_train.engine.config.settings import ConfigError, TrainConfig
from lora_train.engine.data import dataset, doctor
from lora_train.engine.data.doctor.caption_checks import Tokenize
from lora_train.engine.model import Family
from lora_train.engine.output import weight_kinds
from lora_train.engine.output.weight_kinds import FAMILY_NAMES, Shapes
from lora_train.engine.output.weights import WeightsFileError, read_header

# (config key, value that needs it, importable package, what to tell the user)
_PACKAGES = (
    ("optimizer", "adamw8bit", "bitsandbytes", "adamw8bit needs bitsandbytes (pip install bitsandbytes); "
     "or set optimizer: adamw"),
    ("optimizer", "prodigy", "prodigyopt", "prodigy needs prodigyopt (pip install prodigyopt); "
     "or set optimizer: adamw"),
)


def check(cfg: TrainConfig, family: Family | None, tokenize: Tokenize | None = None,
          on_report: Callable[[doctor.Report], None] | None = None) -> dataset.Dataset:
    """Raise ConfigError naming the key (or DatasetError listing every error the dataset doctor finds) for any
    input that would fail later in the run.

    ``family`` is the model's (the WebUI's loaded one, or ``hosts.base_model.base_model_family`` for the CLI);
    None skips the check that ``network_weights`` was trained on that family. ``tokenize`` lets the doctor count
    caption tokens; ``on_report`` hears its report (the CLI prints the summary line) before an error is raised.
    Returns the scanned dataset, so a caller that trains right away need not scan it again
    (``train(..., dataset=)``).
    """
    check_device(cfg.device)
    _check_packages(cfg)
    _check_prompts(cfg)
    _check_resume(cfg.resume)
    if cfg.network_weights:
        check_lora_family(cfg.network_weights, family)
    report = doctor.examine(cfg, tokenize)
    if on_report is not None:
        on_report(report)
    if report.dataset is None:
        raise dataset.DatasetError(report.error_text())
    return report.dataset


def check_device(name: str) -> None:
    """``device`` names a device this torch can use (no AssertionError from a CPU-only torch mid-load)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", f"{name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{name!r} asked for, but this torch sees no CUDA GPU "
                              "(CPU-only build or no driver); use device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device", "mps asked for, but this torch has no Apple GPU; use device: auto or cpu")
    elif device.type != "cpu":
        raise ConfigError("device", f"{name!r} is not supported; use auto, cpu, cuda or mps")


def _check_packages(cfg: TrainConfig) -> None:
    """Optional packages the chosen options import mid-run, looked up without importing them."""
    for key, value, package, message in _PACKAGES:
        if getattr(cfg, key) == value and find_spec(package) is None:
            raise ConfigError(key, message)
    if cfg.logging_dir and find_spec("tensorboard") is None:
        raise ConfigError(
            "logging_dir", "TensorBoard logging needs the tensorboard package, which this Python does not have "
            "(the WebUI's venv must not get it: it upgrades protobuf); leave logging_dir empty, or train with "
            "`python -m lora_train train` in a venv with tensorboard"
        )


def _check_prompts(cfg: TrainConfig) -> None:
    prompts = cfg.prompts  # reads a prompts file: raises ConfigError naming it when missing or not UTF-8
    file = prompts_file(cfg.sample_prompts)
    if file is not None and not prompts and cfg.sample_every_n_steps:
        raise ConfigError("sample_prompts", f"{file} has no prompts; write one prompt per line")


def _check_resume(resume: str | None) -> None:
    if not resume:
        return
    folder = Path(resume)
    hint = "point it at the '<name>-state' folder a stopped or checkpointed run wrote into its output_dir"
    if not folder.exists():
        raise ConfigError("resume", f"folder {folder} does not exist; {hint}")
    if not folder.is_dir():
        raise ConfigError("resume", f"{folder} is a file, not a folder; {hint}")
    info = folder / "state.json"
    if not info.is_file():
        raise ConfigError("resume", f"{folder} has no state.json; {hint}")
    try:
        step = json.loads(info.read_text(encoding="utf-8"))["step"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError("resume", f"{info} is damaged (no readable step); resume from another checkpoint") from None
    if not isinstance(step, int):
        raise ConfigError("resume", f"{info} is damaged (step {step!r}); resume from another checkpoint")


def lora_header(path: str | Path, key: str) -> tuple[Shapes, dict[str, str]]:
    """Shapes and metadata of a kohya/LyCORIS LoRA file (any type we train); ConfigError(key) saying what the file
    is when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key, f"{path} not found; give a LoRA .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(key, f"{path}: a LoRA is read from a .safetensors file (kohya format)")
    try:
        shapes, metadata = read_header(path)
    except WeightsFileError as exc:
        raise ConfigError(key, str(exc)) from None
    if weight_kinds.checkpoint_family(shapes) is not None:
        raise ConfigError(key, f"{path} is {weight_kinds.describe(shapes, metadata)}, not a LoRA; use it as "
                          "base_model, and give this key a LoRA .safetensors")
    if weight_kinds.network_type(shapes) is None:
        raise ConfigError(key, f"{path} is {weight_kinds.describe(shapes, metadata)}; a kohya-format LoRA "
                          "(LoRA/LoCon/DoRA: .lora_down/.lora_up keys; LyCORIS LoHa/LoKr: .hada_*/.lokr_*) is needed")
    return shapes, metadata


def check_lora_family(path: str | Path, family: Family | None) -> None:
    """``network_weights`` is a kohya LoRA trained on ``family`` (None: any family)."""
    shapes, metadata = lora_header(path, "network_weights")
    families = weight_kinds.lora_families(shapes, metadata)
    if family is not None and family not in families:
        name = FAMILY_NAMES[family]
        raise ConfigError("network_weights", f"{path} is a LoRA for {weight_kinds.family_names(families)}, but "
                          f"the model is {name}; pick a LoRA trained on {name} or a matching base_model")
