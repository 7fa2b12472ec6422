"""What a run shows while it trains: preview images (saved beside the run) and TensorBoard scalars."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.files import atomic_write
from lora_train.engine.model import ModelBundle
from lora_train.engine.network.module_flags import ModuleFlags
from lora_train.engine.output.run_paths import RunPaths
from lora_train.engine.train.loss import autocast

SampleFn = Callable[[ModelBundle, list[str], int], list[Image.Image]]


def sample(cfg: TrainConfig, bundle: ModelBundle, paths: RunPaths, step: int,
           sample_fn: SampleFn | None = None) -> tuple[list[Path], list[Image.Image]]:
    """Preview images with every module in eval mode (no LoRA dropout), as txt2img will see the LoRA.

    ``sample_fn`` is the host's own sampler (the WebUI's); without one, diffusers' pipeline draws them.
    Returns the saved files and the images.
    """
    modules = [bundle.unet, *bundle.text_encoders]
    modes = ModuleFlags.capture(modules)
    for module in modules:
        module.eval()
    try:
        images = _draw(cfg, bundle, step, sample_fn)
    finally:
        modes.restore()
    saved = []
    for index, image in enumerate(images):
        path = paths.sample_file(step, index)
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        saved.append(path)
    return saved, images


def _draw(cfg: TrainConfig, bundle: ModelBundle, step: int, sample_fn: SampleFn | None) -> list[Image.Image]:
    if sample_fn:
        return sample_fn(bundle, cfg.prompts, step)
    from lora_train.engine.train.sampler import sample_images  # diffusers: the CLI's venv has it, the WebUI's need not

    height, width = cfg.resolution_hw
    with autocast(cfg, bundle.device):
        return sample_images(bundle, cfg.prompts, height, width, cfg.sample_steps, cfg.sample_cfg_scale,
                             seed=cfg.seed)


def tensorboard_writer(folder: Path | None, run_name: str):
    """A SummaryWriter in ``folder/<run_name>-<time>`` (one run per subfolder, as TensorBoard lists them), or None."""
    if folder is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"))
