"""A training request from the tab or the API made into a config the job runner can start.

Every path is checked against the WebUI's path policy and every output is named here, before a job exists, so a
bad request fails at once with the config key it came from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lora_train.engine.config import yaml_io
from lora_train.engine.config.settings import ConfigError, TrainConfig
from lora_train.engine.output.run_paths import plan_run
from lora_train.webui.paths import INPUT_KEYS, PathPolicy, resolve, sanitize_name


def prepare_config(data: dict[str, Any] | TrainConfig, policy: PathPolicy) -> TrainConfig:
    """A validated config whose paths exist and pass ``policy``, and whose outputs go to the policy's roots.

    The final file will be ``<output root>/<name>.safetensors`` with a name none of whose artifacts exist now
    (never overwriting); resumable state, step checkpoints and samples go to the run root (``<name>-state/``,
    ``<name>-stepN.safetensors``, ``sample/``), which the policy keeps out of the WebUI's Lora folder. A caption
    ``metadata.csv`` in the dataset folder is used when no ``metadata_path`` is given. Everything that can be
    wrong with a path is found here, before a job starts, with the config key it came from; an ``output_name``
    naming a path is refused with the CLI's sentence, an empty one becomes "lora".
    """
    # a name with a path in it ("../x") is refused by the config's own check, as the CLI refuses it; what is left
    # to clean is what a file system would trip on (reserved device names, trailing dots, length)
    cfg = data if isinstance(data, TrainConfig) else yaml_io.from_dict(
        {**data, "output_name": str(data.get("output_name") or "").strip() or "lora"})
    name = sanitize_name(cfg.output_name, fallback="lora")
    if not cfg.train_data_dir:
        raise ConfigError("train_data_dir", "pick the folder with your training images")
    changes: dict[str, Any] = {}
    for key in INPUT_KEYS:
        value = getattr(cfg, key)
        if value:
            changes[key] = str(policy.check_exists(value, key))
    if not cfg.metadata_path:
        csv_path = Path(changes["train_data_dir"]) / "metadata.csv"
        if csv_path.is_file():
            changes["metadata_path"] = str(csv_path)
    if cfg.resume:  # the trainer keeps the resumed run's own name (run_paths.plan_run)
        changes["output_dir"] = str(policy.check_output(resolve(cfg.resume).parent, "resume"))
    else:
        name = plan_run(policy.output_root, policy.run_root, name).name
        changes["output_dir"] = str(policy.run_root)
    changes["output_name"] = name
    changes["overwrite"] = False
    if cfg.logging_dir:
        changes["logging_dir"] = str(policy.check_output(cfg.logging_dir, "logging_dir"))
    return dataclasses.replace(cfg, **changes)
