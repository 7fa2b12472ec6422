"""The standalone ``ui`` server's TrainHost: a diffusers bundle loaded from ``base_model`` and kept between runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.model import ModelBundle
from lora_train.engine.train.samples import SampleFn
from lora_train.webui.jobs import HostError, Job, TrainHost


class DiffusersHost(TrainHost):
    """Loads ``cfg.base_model`` as ``train`` does (hosts.diffusers.load_model); keeps the last one for the next run."""

    def __init__(self, base_model: str = "tiny"):
        self.base_model = base_model
        self._key: tuple | None = None
        self._bundle: ModelBundle | None = None
        self._lock = threading.Lock()

    def family(self) -> str | None:
        from lora_train.hosts.architectures import BUILTIN

        if self._bundle is not None:
            return self._bundle.family
        arch = BUILTIN.get(self.base_model)
        return arch.family if arch else None

    def device_type(self) -> str:
        """Where the loaded model is (``device`` may pin it to the CPU on a GPU machine)."""
        return self._bundle.device.type if self._bundle is not None else super().device_type()

    def check(self, cfg: TrainConfig) -> None:
        model = cfg.base_model or self.base_model
        from lora_train.hosts.architectures import BUILTIN

        if model not in BUILTIN and not Path(model).expanduser().exists():
            raise HostError(f"base_model {model!r}: no such checkpoint file or folder")

    @contextmanager
    def session(self, cfg: TrainConfig, job: Job) -> Iterator[tuple[ModelBundle, SampleFn | None]]:
        from lora_train.hosts.diffusers import load_model

        key = (cfg.base_model, cfg.device, cfg.mixed_precision, cfg.clip_skip, cfg.v_parameterization)
        with self._lock:
            if key != self._key:
                job.add_log(f"loading {cfg.base_model}")
                self._bundle, self._key = None, None
                self._bundle, self._key = load_model(cfg), key
            yield self._bundle, None

    @contextmanager
    def grid_session(self, spec, log) -> Iterator:
        """The loaded model (or ``base_model``) with each row's LoRA applied by the engine (grid_render)."""
        from lora_train.engine.output.grid_render import BundleRenderer
        from lora_train.hosts.diffusers import load_model

        with self._lock:
            if self._bundle is None:
                log(f"loading {self.base_model}")
                cfg = TrainConfig(base_model=self.base_model)
                self._bundle = load_model(cfg)
                self._key = (cfg.base_model, cfg.device, cfg.mixed_precision, cfg.clip_skip, cfg.v_parameterization)
            with BundleRenderer(self._bundle, spec) as renderer:
                yield renderer
