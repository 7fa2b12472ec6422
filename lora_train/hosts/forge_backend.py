"""ModelBundle over the model Forge 2 / Neo hold in their own ``backend`` (``shared.sd_model`` is a
``backend.diffusion_engine`` object): zero copy, the backend's own modules and code.

Nothing here imports Forge: the engine object is duck-typed, so the engine and its tests run anywhere. What the
bundle reads, and from where (lllyasviel/stable-diffusion-webui-forge dfdcbab6, ``backend/``):

- UNet: ``forge_objects.unet.model`` is a KModel: ``.diffusion_model`` (IntegratedUNet2DConditionModel, LDM names:
  input_blocks / middle_block / output_blocks), ``.predictor`` (``alphas_cumprod``, ``prediction_type``),
  ``.storage_dtype``.
- Text: the engine's ClassicTextProcessingEngine(s) (``text_processing_engine`` for SD1.5; ``_l`` and ``_g`` for
  SDXL): their tokenizer and 75-token chunks, and their ``process_tokens``, which runs the CLIP model with the clip
  skip, final layer norm and pooled projection the engine uses for generation. SDXL's size vector comes from the
  engine's own ``embedder`` (Timestep(256)) in ``get_learned_conditioning``'s order. Emphasis weights and textual
  inversion embeddings in captions are not applied: the trainer gives every token weight 1.
- VAE: ``forge_objects.vae.first_stage_model`` (IntegratedAutoencoderKL): its ``encode`` with the posterior's
  mode (the mean, as the other hosts use), then ``process_in`` (shift and scale); ``process_out`` + ``decode`` back.

The family comes from the engine class (``StableDiffusion`` → SD1, ``StableDiffusionXL`` → SDXL); other engines
(SD2, the SDXL refiner, SD3, Flux, Chroma) raise ValueError naming the families that work.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from lora_train.engine.data.prompt_chunks import PromptTokens, pad_after_end
from lora_train.engine.model import Conditioning, Family, LoraTarget, Parameterization, UnetPlacement
from lora_train.engine.network import kohya_names
from lora_train.hosts.ldm import checkpoint_name
from lora_train.hosts.vae_fallback import encode_finite

ENGINE_FAMILIES: dict[str, Family] = {"StableDiffusion": "sd1", "StableDiffusionXL": "sdxl"}
WORKING_FAMILIES = "SD1.5 and SDXL"
PREDICTIONS: dict[str, Parameterization] = {"epsilon": "eps", "eps": "eps", "v_prediction": "v", "v": "v"}
CHUNK = 77


def is_backend_engine(sd_model: Any) -> bool:
    """Forge 2 / Neo: the loaded model is an object of Forge's ``backend.diffusion_engine`` package."""
    return type(sd_model).__module__.startswith("backend.diffusion_engine") and hasattr(sd_model, "forge_objects")


def engine_family(sd_model: Any) -> Family:
    """SD1 or SDXL from the engine class; ValueError naming the loaded engine and the families that work."""
    cls = type(sd_model)
    family = ENGINE_FAMILIES.get(cls.__name__)
    if family is None:
        raise ValueError(
            f"the loaded model is Forge's {cls.__name__} ({cls.__module__}); LoRA training inside Forge works on "
            f"{WORKING_FAMILIES} checkpoints. Load one of those in the checkpoint dropdown, then press Train again"
        )
    return family


class ForgeBackendBundle(UnetPlacement):
    """Forge's backend engine behind the ModelBundle interface; every module is the host's own."""

    shares_host_weights = True  # the trainer must not re-layout these weights (channels_last copies the UNet)

    def __init__(self, sd_model: Any, clip_skip: int = 1, parameterization: Parameterization | None = None):
        self.sd_model = sd_model
        self.family: Family = engine_family(sd_model)
        objects = sd_model.forge_objects
        self.kmodel: nn.Module = objects.unet.model
        self.unet: nn.Module = self.kmodel.diffusion_model
        if getattr(self.unet, "in_channels", 4) != getattr(self.unet, "out_channels", 4) or getattr(
                sd_model, "is_inpaint", False):
            raise ValueError("the loaded model is an inpainting model; load a regular checkpoint to train a LoRA")
        self.vae: nn.Module = objects.vae.first_stage_model
        self.clip_skip = clip_skip
        self.zero_terminal_snr = False  # the checkpoint's own schedule (the bundle refuses the A1111 option)
        predictor = self.kmodel.predictor
        if parameterization is None:
            kind = getattr(predictor, "prediction_type", "epsilon")
            if kind not in PREDICTIONS:
                raise ValueError(f"the loaded model predicts {kind!r}; only epsilon and v models can be trained")
            parameterization = PREDICTIONS[kind]
        self.parameterization: Parameterization = parameterization
        self.alphas_cumprod = predictor.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self.model_name = checkpoint_name(sd_model, self.family)
        if self.family == "sdxl":
            self.engines = [sd_model.text_processing_engine_l, sd_model.text_processing_engine_g]
        else:
            self.engines = [sd_model.text_processing_engine]
        # HF CLIPTextModel(s) inside Forge's IntegratedCLIP: kohya's lora_te_ / lora_te1_ / lora_te2_ layers
        self.text_encoders: list[nn.Module] = [engine.text_encoder.transformer for engine in self.engines]
        blocks = self.unet.num_res_blocks
        self.layers_per_block = int(blocks if isinstance(blocks, int) else blocks[0])
        self.gradient_checkpointing = False
        self._blocks = [m for m in self.unet.modules() if callable(getattr(type(m), "_forward", None))]

    # -- text ---------------------------------------------------------------------------------------------------
    def tokenize(self, captions: list[str], max_chunks: int = 1, weighted: bool = False) -> PromptTokens:
        """Token ids per text encoder as the engine chunks a prompt (its own parser: emphasis read, brackets
        unescaped): [batch, 77 * chunks], at most ``max_chunks``; the engine's multipliers only when ``weighted``."""
        ids, multipliers = [], []
        for engine in self.engines:
            batch_chunks, _ = engine.process_texts(captions)
            kept = [chunks[:max_chunks] for chunks in batch_chunks]
            count = max(len(chunks) for chunks in kept)
            padded = [chunks + [engine.empty_chunk() for _ in range(count - len(chunks))] for chunks in kept]
            # the ids as the engine's process_tokens feeds them to its encoder (OpenCLIP's 0 after the end token)
            rows = [[tok for chunk in chunks for tok in pad_after_end(chunk.tokens, engine.id_end, engine.id_pad)]
                    for chunks in padded]
            ids.append(torch.tensor(rows))
            weights = [[w if weighted else 1.0 for chunk in chunks for w in chunk.multipliers] for chunks in padded]
            multipliers.append(torch.tensor(weights, dtype=torch.float32))
        return PromptTokens(ids, multipliers)

    def encode_text(self, tokens: PromptTokens) -> Conditioning:
        contexts, pooled = [], None
        for engine, ids, weights in zip(self.engines, tokens.ids, tokens.multipliers, strict=True):
            chunks = [self._encode_chunk(engine, ids[:, i : i + CHUNK], weights[:, i : i + CHUNK])
                      for i in range(0, ids.shape[1], CHUNK)]
            contexts.append(torch.hstack(chunks))
            if getattr(engine, "return_pooled", False):
                pooled = getattr(chunks[0], "pooled", None)  # the first chunk's, as the engine returns it
        if self.family != "sdxl":
            return Conditioning(context=contexts[0])
        return Conditioning(context=torch.cat(contexts, dim=-1), pooled=pooled)

    def _encode_chunk(self, engine: Any, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows = ids.tolist()
        saved = engine.clip_skip
        if self.family == "sd1":  # SDXL's engines always use the penultimate layer (minimal_clip_skip 2)
            engine.clip_skip = self.clip_skip
        engine.embeddings.fixes = None  # no textual inversion vectors to splice in
        try:
            return engine.process_tokens(rows, weights.tolist())
        finally:
            engine.clip_skip = saved

    # -- images ---------------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_finite(self.vae, self._encode, pixels)  # fp32 where the half-precision VAE overflows

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.process_in(self.vae.encode(pixels, regulation=lambda posterior: posterior.mode()))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        first = next(self.vae.parameters())
        return self.vae.decode(self.vae.process_out(latents.to(first.device, first.dtype)))

    # -- the UNet -------------------------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        kwargs: dict[str, Any] = {"transformer_options": {}}  # a fresh dict: Forge's default one is shared
        if self.family == "sdxl":
            kwargs["y"] = self.vector(cond, noisy)
        with self._checkpoint_mode():
            return self.unet(noisy, timesteps, context=cond.context, **kwargs)

    def vector(self, cond: Conditioning, noisy: torch.Tensor) -> torch.Tensor:
        """SDXL's ``y`` as ``get_learned_conditioning`` builds it: pooled, then Timestep(256) of h, w, crop top,
        crop left, target h, target w."""
        if cond.pooled is None:
            raise ValueError("SDXL needs the pooled text embedding (Conditioning.pooled)")
        size_ids = cond.size_ids
        if size_ids is None:  # uncropped, original size = target size = the latent's size in pixels
            height, width = (s * 8 for s in noisy.shape[-2:])
            size_ids = torch.tensor([[height, width, 0, 0, height, width]] * noisy.shape[0])
        embedder = self.sd_model.embedder
        flat = torch.stack([torch.flatten(embedder(row.float().cpu())) for row in size_ids])
        return torch.cat([cond.pooled, flat.to(cond.pooled)], dim=1)

    @contextmanager
    def _checkpoint_mode(self) -> Iterator[None]:
        """torch's non-reentrant checkpointing around each block's ``_forward`` for one call when enabled (Forge's
        own ``checkpoint`` raises NotImplementedError when switched on); every attribute is removed afterwards."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            yield
            return
        try:
            for module in self._blocks:
                module.forward = functools.partial(_checkpointed, module._forward)
            yield
        finally:
            for module in self._blocks:
                vars(module).pop("forward", None)

    def lora_targets(self, text_encoder: bool, conv: bool = False) -> list[LoraTarget]:
        """kohya's default targets, named as Forge's own LoRA loader resolves them for this family (SD1: diffusers
        block names, SDXL: input_blocks names; text encoders lora_te_ / lora_te1_ / lora_te2_)."""
        return kohya_names.find_targets(
            self.unet, self.text_encoders, self.family, "ldm", self.layers_per_block, text_encoder, conv
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = enabled


def _checkpointed(function: Any, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
