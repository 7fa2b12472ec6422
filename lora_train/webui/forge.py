"""Forge-family WebUIs built on ``ldm_patched`` (reForge, Forge Classic): what training their loaded model needs.

Both keep A1111's LatentDiffusion object, so ``LdmBundle`` reads it unchanged, with Forge's ModelPatchers beside it
in ``sd_model.forge_objects``. Two things differ from A1111, and this adapter handles them:

- The built-in Lora extension does not merge in place. ``<lora:…>`` swaps ``forge_objects.unet``/``.clip`` for
  patcher clones; Forge's memory manager applies their patches when it loads them (new Parameters, created under
  inference mode) and the merge stays after the generation. Training then would start from someone else's LoRA and
  fail ("Inference tensors do not track version counter"). We do what the next plain generation does: put the
  original patchers back and load them with ``model_management.load_models_gpu``, which unloads the clone (its
  ``unpatch_model`` puts the original weights back). On a GPU this also moves the models onto it for the run.
- Forge Classic's transformer blocks add residuals in place; ``forge_patches`` makes them add out of place for
  the run and restores them afterwards, also after a stop or a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from lora_train.webui.forge_patches import out_of_place_transformer_blocks
from lora_train.webui.jobs import HostError
from lora_train.webui.ldm_host import LdmHost

NO_MEMORY_MANAGER = ("This Forge WebUI's model manager (ldm_patched.modules.model_management) could not be imported, "
                     "so a <lora:…> merged by the last generation cannot be undone. Restart the WebUI and train "
                     "before generating with a LoRA.")
STILL_MERGED = ("The loaded model's weights are still the inference copies of a <lora:…> generation. Generate one "
                "image without <lora:…> in the prompt, then press Train again.")


def is_ldm_patched(sd_model: Any) -> bool:
    """A Forge model in A1111's shape: ``forge_objects`` beside an ``ldm_patched`` UNet at ``model.diffusion_model``."""
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    return hasattr(sd_model, "forge_objects") and type(unet).__module__.startswith("ldm_patched.")


class ForgeModel(LdmHost):
    """The loaded model of reForge / Forge Classic: undo the prompt LoRA, make the blocks trainable for the run."""

    name = "Forge (ldm_patched: reForge, Forge Classic)"

    def __init__(self, model_management: Callable[[], Any | None]):
        self.model_management = model_management

    def undo_prompt_lora(self, sd_model: nn.Module, networks: Any | None, log: Callable[[str], None]) -> None:
        """Put back the patchers a generation without ``<lora:…>`` uses, and load them (unpatches any LoRA clone).

        Mirrors extensions-builtin/Lora/networks.py ``load_networks([])`` and forge_loader's initial
        ``current_lora_hash = str([])``, so the next ``<lora:…>`` generation applies its LoRA again.
        """
        # a merge is in the weights (generations run under inference mode); a swapped patcher alone is not one:
        # always-on scripts (FreeU, RescaleCFG, ...) clone the UNet's patcher in every generation
        merged = _has_inference_weights(sd_model)
        swapped = put_back_original_patchers(sd_model, networks)
        manager = self.model_management()
        if manager is None:
            if swapped or merged:
                raise HostError(NO_MEMORY_MANAGER)
            return
        manager.load_models_gpu(patchers_to_load(sd_model.forge_objects))
        if _has_inference_weights(sd_model):
            raise HostError(STILL_MERGED)
        if merged:
            log("undid the <lora:…> merge of the last generation (Forge's patchers put back and reloaded)")

    @contextmanager
    def run_scope(self, sd_model: nn.Module, log: Callable[[str], None]) -> Iterator[None]:
        """Out-of-place residual adds in the UNet's transformer blocks for the run; Forge's own method afterwards."""
        with out_of_place_transformer_blocks(sd_model.model.diffusion_model) as report:
            if report.patched:
                log(f"{report.patched} Forge transformer blocks add out of place for this run ({report.method})")
            if report.skipped:
                log(f"left alone (another extension overrides them): {', '.join(report.skipped)}")
            yield


def put_back_original_patchers(sd_model: Any, networks: Any | None) -> bool:
    """What a generation without ``<lora:…>`` does to Forge's objects (every Forge: reForge, Classic, Forge 2, Neo):
    the original UNet/CLIP patchers back in ``forge_objects``, the Lora extension's list and hash emptied.

    Loading them afterwards (``patchers_to_load``) makes Forge's memory manager unpatch what a LoRA clone patched.
    Returns whether a LoRA clone was in place.
    """
    loaded = getattr(networks, "loaded_networks", None) if networks is not None else None
    if isinstance(loaded, list):
        loaded.clear()
    objects, original = sd_model.forge_objects, sd_model.forge_objects_original
    swapped = objects.unet is not original.unet or objects.clip is not original.clip
    objects.unet, objects.clip = original.unet, original.clip
    sd_model.current_lora_hash = str([])
    sd_model.forge_objects_after_applying_lora = objects.shallow_copy()
    return swapped


def patchers_to_load(objects: Any) -> list[Any]:
    """The UNet's patcher, and the text encoder's and VAE's: training runs them all, and Forge keeps what is not
    loaded on its offload device."""
    extra = [getattr(getattr(objects, part, None), "patcher", None) for part in ("clip", "vae")]
    return [objects.unet] + [patcher for patcher in extra if patcher is not None]


def _has_inference_weights(model: nn.Module) -> bool:
    return any(p.is_inference() for p in model.parameters())
