"""The dataset doctor for a request from the tab or the REST API: the same config body as a job, the same path
policy, the engine's checker (``engine.data.doctor``) and its fixes. Nothing here renders anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_train.engine.config.settings import ConfigError, TrainConfig
from lora_train.engine.data import doctor
from lora_train.engine.data.doctor import fixes
from lora_train.hosts.clip_tokenizer import caption_tokenizer
from lora_train.webui.jobs import JobRunner
from lora_train.webui.run_config import prepare_config


def request_config(runner: JobRunner, data: dict[str, Any] | TrainConfig) -> TrainConfig:
    """A job's config as ``submit`` would make it (paths checked against the policy, metadata.csv found), without
    starting anything; ConfigError (PathNotAllowed) naming the key otherwise."""
    if isinstance(data, dict):
        data = {key: value for key, value in data.items() if key != "preset"}
    return prepare_config(data, runner.policy)


def check(runner: JobRunner, data: dict[str, Any] | TrainConfig, preset: str | None = None,
          on_progress: Callable[[int, int], None] | None = None) -> tuple[TrainConfig, doctor.Report]:
    """(the config, the doctor's report) for a job request."""
    cfg = request_config(runner, data)
    return cfg, doctor.examine(cfg, caption_tokenizer(), preset, on_progress=on_progress)


def fix(runner: JobRunner, data: dict[str, Any] | TrainConfig, name: str, preset: str | None = None,
        trigger: str | None = None) -> tuple[fixes.FixResult, doctor.Report]:
    """Apply fix ``name`` (exclude, trigger, tags) to what the doctor finds now; (what changed, the new report)."""
    if name not in ("exclude", "trigger", "tags"):
        raise ConfigError("fix", f"unknown fix {name!r}; one of exclude, trigger, tags (captions: the Caption button)")
    cfg, report = check(runner, data, preset)
    try:
        result = fixes.apply(report, cfg, name, trigger)
    except fixes.FixError as exc:
        raise ConfigError("fix", str(exc)) from None
    return result, doctor.examine(cfg, caption_tokenizer(), preset)
