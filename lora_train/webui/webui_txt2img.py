"""One image through the WebUI's own txt2img path (``process_images``) with the loaded checkpoint pinned.

Training previews and the epoch x strength grid both render this way, so what they show is what txt2img gives.
"""

from __future__ import annotations

from typing import Any

from lora_train.webui.jobs import HostError


def keep_loaded_model(model: Any) -> dict[str, str]:
    """txt2img settings that pin the checkpoint under training.

    ``process_images`` reloads whatever the checkpoint dropdown names when no override is given; a user who
    changed the dropdown during training would get new weights loaded into the model being trained. Naming the
    loaded checkpoint as the override makes that reload a no-op, and the dropdown's value is restored afterwards.
    """
    title = getattr(getattr(model, "sd_checkpoint_info", None), "title", None)
    return {"sd_model_checkpoint": title} if title else {}


def txt2img(processing: Any, shared: Any, during: str, **settings: Any) -> Any:
    """``process_images`` of one txt2img image with ``settings`` (prompt, size, steps, ...) on the loaded model;
    the WebUI's ``Processed``. Raises HostError naming ``during`` when the WebUI swapped the model meanwhile."""
    model = shared.sd_model
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=model, batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True,
        override_settings=keep_loaded_model(model), override_settings_restore_afterwards=True, **settings,
    )
    # An empty script runner rather than none: reForge's process_images reads ``p.scripts.alwayson_scripts``
    # without a None check (modules/processing.py at 3b56b268), so every image failed there. With no scripts in
    # it nothing runs, as with None on A1111, Forge Classic and Forge 2 (all three import the same runner).
    p.scripts = processing.scripts.ScriptRunner()
    try:
        processed = processing.process_images(p)
    finally:
        if hasattr(p, "close"):
            p.close()
    if shared.sd_model is not model:
        raise HostError(f"the WebUI swapped the model during {during}")
    return processed
