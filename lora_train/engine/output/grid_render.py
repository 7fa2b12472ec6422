"""Grid cells drawn with any ModelBundle (the CLI's diffusers model): the LoRA file applied at a strength.

Each row's file is put into the model with the same layers training uses (``lora.inject`` + ``load_kohya``, the
network read from the file's ``ss_network_*`` metadata) and its strength is peft's layer scale, so strength w
adds w times the trained change, as ``<lora:name:w>`` does in the WebUI. The model is back to its own weights
afterwards (``close``).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from lora_train.engine.config.network_spec import spec_of
from lora_train.engine.model import ModelBundle
from lora_train.engine.network import lora
from lora_train.engine.output.export import read_lora
from lora_train.engine.output.grid import GridRow, GridSpec


class BundleRenderer:
    """A ``grid.Renderer`` over ``bundle``; use as a context manager so the LoRA always comes out again."""

    def __init__(self, bundle: ModelBundle, spec: GridSpec):
        self.bundle, self.spec = bundle, spec
        self.loaded: str | None = None
        self.network: lora.LoraNetwork | None = None

    def __enter__(self) -> BundleRenderer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.network is not None:
            lora.remove(self.network)
        self.network, self.loaded = None, None

    def _load(self, path: str) -> lora.LoraNetwork:
        if self.loaded == path and self.network is not None:
            return self.network
        self.close()
        tensors, meta = read_lora(path)
        args = json.loads(meta.get("ss_network_args") or "{}")
        spec = spec_of({"network_module": meta.get("ss_network_module", "networks.lora"), "conv_dim": 0,
                        "conv_alpha": 1.0, "lora_dropout": 0.0,
                        "network_args": [f"{key}={value}" for key, value in args.items()]})
        rank, alpha = lora.network_dims(tensors)
        text_encoder = any(key.startswith("lora_te") for key in tensors)
        targets = self.bundle.lora_targets(text_encoder, conv=spec.conv_dim > 0)
        self.network = lora.inject(targets, rank, alpha, 0.0, spec)
        self.loaded = path
        lora.load_kohya(self.network, tensors, path)
        return self.network

    def __call__(self, row: GridRow | None, strength: float, prompt: str) -> tuple[Image.Image, str]:
        from lora_train.engine.train.sampler import sample_images  # diffusers: the CLI's venv has it

        spec = self.spec
        if row is None:
            self.close()
        else:
            for layer in self._load(row.path).layers.values():
                layer.unscale_layer(None)
                layer.scale_layer(strength)
        for module in (self.bundle.unet, *self.bundle.text_encoders):
            module.eval()
        image = sample_images(self.bundle, [prompt], spec.height, spec.width, spec.steps, spec.cfg_scale,
                              seed=spec.seed, negative=spec.negative)[0]
        lora_text = f", LoRA: {Path(row.path).name}, Strength: {strength:g}" if row else ""
        infotext = (f"{prompt}\nNegative prompt: {spec.negative}\nSteps: {spec.steps}, Sampler: DDIM, CFG scale: "
                    f"{spec.cfg_scale:g}, Seed: {spec.seed}, Size: {spec.width}x{spec.height}, "
                    f"Model: {self.bundle.model_name}{lora_text}")
        return image, infotext
