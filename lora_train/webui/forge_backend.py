"""Forge 2 and Neo (``backend``): what training their loaded model needs, on Forge's own objects, without a copy.

``shared.sd_model`` is a ``backend.diffusion_engine`` object (StableDiffusion, StableDiffusionXL, …) holding
ModelPatchers in ``forge_objects``; ``hosts.forge_backend.ForgeBackendBundle`` reads it. Before a run this adapter

1. undoes a ``<lora:…>`` left by the last generation as a plain generation would (the original patchers back,
   loaded by Forge's memory manager, whose LoRA loader then restores the weights it kept), which also loads UNet,
   text encoder and VAE onto the training device;
2. refuses weights Forge keeps quantised (NF4/FP4/FP8/GGUF) or streams from CPU memory, naming the option to
   change, and encodes an empty prompt with the engine's own ``get_learned_conditioning``, whose first call changes
   the text encoder's embeddings to fp32, as any first generation does;
3. turns every inference tensor of those three models into an ordinary tensor in place (``forge_weights``): Forge
   loads and merges under ``torch.inference_mode()``, and autograd cannot save inference tensors for backward.

For the run only (``run_scope``), the UNet's transformer blocks add residuals out of place and Forge's own Linear
layers count as ``nn.Linear`` so peft wraps them (``forge_patches``). Afterwards only the patcher state set in step
1 stays; the weights are the same values, and Forge's LoRA loader patches and restores them as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lora_train.engine.model import Family, ModelBundle, Parameterization
from lora_train.hosts.forge_backend import ForgeBackendBundle, engine_family
from lora_train.webui.forge import patchers_to_load, put_back_original_patchers
from lora_train.webui.forge_patches import forge_linears_as_nn_linear, out_of_place_transformer_blocks
from lora_train.webui.forge_weights import TRAINABLE_DTYPES, make_ordinary_in_place, untrainable_dtypes
from lora_train.webui.jobs import HostError

QUANTISED = ("Forge keeps this checkpoint's {part} quantised ({kinds}); LoRA training needs fp16, bf16 or fp32 "
             "weights: set \"Diffusion in Low Bits\" at the top of the page to Automatic (for a GGUF file, load a "
             "non-GGUF checkpoint; for the text encoder, start Forge without --clip-in-fp8-*), then press Train again.")
OFFLOADED = ("Forge streams part of this model from CPU memory because it does not fit in \"GPU Weights (MB)\" at "
             "the top of the page; raise GPU Weights until the whole model fits on the GPU (or free VRAM), then press "
             "Train again.")
NO_MEMORY_MANAGER = ("Forge's memory manager (backend.memory_management) could not be imported, so the model cannot "
                     "be loaded for training; restart the WebUI and try again.")


class ForgeBackendModel:
    """The loaded model of Forge 2 / Neo: bundle over ``forge_objects``, prompt LoRA undone, weights trainable."""

    name = "Forge 2 (backend: lllyasviel's Forge, Neo)"

    def __init__(self, model_management: Callable[[], Any | None]):
        self.model_management = model_management

    # -- what the job asks about the model ------------------------------------------------------------------------
    def family(self, sd_model: Any) -> Family:
        return engine_family(sd_model)

    def weights(self, sd_model: Any) -> nn.Module:
        """UNet (with its predictor), text encoders and VAE, gathered without changing them."""
        objects = sd_model.forge_objects
        return nn.ModuleDict({"unet": objects.unet.model, "clip": objects.clip.cond_stage_model,
                              "vae": objects.vae.first_stage_model})

    def bundle(self, sd_model: Any, clip_skip: int, parameterization: Parameterization | None,
               sdxl_clip_l_skip: bool = False, zero_terminal_snr: bool = False) -> ModelBundle:
        self.family(sd_model)  # the engine first: a Flux model is refused as Flux, not for its storage
        self._check_storage(sd_model)
        if zero_terminal_snr:  # the A1111 option; Forge 2's engine keeps its own schedule, so say so
            raise ValueError("training on Forge 2 follows the checkpoint's own noise schedule; set the noise "
                             "schedule back to Default")
        # sdxl_clip_l_skip: Forge 2's engine applies its one clip skip to both SDXL encoders, as it generates
        return ForgeBackendBundle(sd_model, clip_skip=clip_skip, parameterization=parameterization)

    def storage_problem(self, sd_model: Any) -> str | None:
        """Forge's own sentence for weights kept quantised or streamed from CPU memory (None for an engine we do
        not train: ``bundle`` names the families that work)."""
        try:
            self.family(sd_model)
            self._check_storage(sd_model)
        except ValueError:
            return None
        except HostError as exc:
            return str(exc)
        return None

    def _check_storage(self, sd_model: Any) -> None:
        objects = sd_model.forge_objects
        unet = objects.unet.model
        kinds = untrainable_dtypes([unet.diffusion_model])
        storage = getattr(unet, "storage_dtype", None)
        if storage is not None and storage not in TRAINABLE_DTYPES:
            kinds.add(str(storage).replace("torch.", ""))
        if kinds:
            raise HostError(QUANTISED.format(part="UNet", kinds=", ".join(sorted(kinds))))
        kinds = untrainable_dtypes([objects.clip.cond_stage_model, objects.vae.first_stage_model])
        if kinds:
            raise HostError(QUANTISED.format(part="text encoder or VAE", kinds=", ".join(sorted(kinds))))
        self._check_not_offloaded(objects)

    def _check_not_offloaded(self, objects: Any) -> None:
        """Forge's LoadedModel sets ``model_accelerated`` when it keeps part of a model in CPU memory and moves it
        layer by layer during each forward; training needs every weight where the step runs."""
        manager = self.model_management()
        ours = {id(patcher) for patcher in patchers_to_load(objects)}
        for loaded in getattr(manager, "current_loaded_models", None) or []:
            if id(getattr(loaded, "model", None)) in ours and getattr(loaded, "model_accelerated", False):
                raise HostError(OFFLOADED)

    # -- before and around a run ----------------------------------------------------------------------------------
    def undo_prompt_lora(self, sd_model: Any, networks: Any | None, log: Callable[[str], None]) -> None:
        """The checkpoint's own weights, loaded on the training device, as ordinary tensors (see the module doc)."""
        swapped = put_back_original_patchers(sd_model, networks)
        manager = self.model_management()
        if manager is None:
            raise HostError(NO_MEMORY_MANAGER)
        patchers = patchers_to_load(sd_model.forge_objects)
        with torch.inference_mode():  # as Forge itself loads (its LoRA loader runs under inference mode anyway)
            manager.load_models_gpu(patchers)
            for patcher in patchers:  # a patcher that was already loaded was not refreshed by the call above
                loader = getattr(patcher, "lora_loader", None)
                if loader is not None and loader.loaded_hash != str(list(patcher.lora_patches.keys())):
                    patcher.refresh_loras()
        if swapped:
            log("undid the <lora:…> merge of the last generation (Forge's patchers put back and reloaded)")
        self._check_storage(sd_model)
        # Forge's first text encoding turns the CLIP embeddings to fp32 (classic_engine.encode_with_transformers):
        # let it happen now, as a generation would, not inside the run the snapshot guards
        sd_model.get_learned_conditioning([""])
        started = time.perf_counter()
        replaced = make_ordinary_in_place(self.weights(sd_model).children())
        if replaced:
            log(f"{replaced} of Forge's inference tensors made ordinary tensors in place, one at a time "
                f"({time.perf_counter() - started:.1f} s; same values, no second copy of the model)")

    @contextmanager
    def run_scope(self, sd_model: Any, log: Callable[[str], None]) -> Iterator[None]:
        """Out-of-place residual adds in the UNet's blocks and Forge's Linears as ``nn.Linear``, for the run only."""
        objects = sd_model.forge_objects
        unet = objects.unet.model.diffusion_model
        with out_of_place_transformer_blocks(unet) as report, \
                forge_linears_as_nn_linear([unet, objects.clip.cond_stage_model]) as linears:
            if report.patched:
                log(f"{report.patched} Forge transformer blocks add out of place for this run ({report.method})")
            if report.skipped:
                log(f"left alone (another extension overrides them): {', '.join(report.skipped)}")
            if linears:
                log(f"{linears} Forge Linear layers take LoRA as nn.Linear for this run")
            yield
