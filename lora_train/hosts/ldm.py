"""ModelBundle over the model object the WebUI already holds (``modules.shared.sd_model``): zero copy.

The object is an ldm ``LatentDiffusion`` (SD1, SD2) or an sgm ``DiffusionEngine`` (SDXL) as A1111 loads and
patches it. Nothing here imports A1111, ``ldm`` or ``sgm``: the object is duck-typed, so the engine imports
and tests run anywhere. What the bundle reads, and from where:

- UNet: ``sd_model.model.diffusion_model`` (input_blocks / middle_block / output_blocks).
- VAE: ``sd_model.first_stage_model`` and ``sd_model.scale_factor``; latents are the posterior *mean* times the
  scale factor, as the diffusers host does, so a cached latent does not depend on an RNG draw.
- Text: SD1 ``cond_stage_model`` (A1111 wraps ldm's FrozenCLIPEmbedder in ``.wrapped``; the HF CLIPTextModel is
  ``.transformer``), SD2 its FrozenOpenCLIPEmbedder (``.model``, penultimate layer), SDXL
  ``conditioner.embedders`` (CLIP-L, OpenCLIP-bigG with the pooled vector, then the size embedders that build
  the vector ``y``). Each embedder's own settings (``layer``, ``layer_idx``) decide which hidden state is used.
- ``parameterization`` ("eps" or "v") and ``alphas_cumprod`` (``alphas_cumprod_original`` when A1111 keeps the
  training schedule there because a zero-terminal-SNR or downcast override is active).

The bundle never leaves a change behind on the host: gradient checkpointing and the bypass of ldm's own
``checkpoint`` (whose custom autograd function cannot run with frozen parameters) are switched on only for the
duration of one ``predict`` call; the tests prove it by comparing every host tensor before and after.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from lora_train.engine.model import Conditioning, Family, LoraTarget, Parameterization
from lora_train.engine.network import kohya_names
from lora_train.hosts.ldm_embedders import detect_family, inner, is_hf_clip, is_open_clip
from lora_train.hosts.vae_fallback import encode_finite

MAX_LENGTH = 77
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
TEXT_ENCODER_NOTE = (
    "train_text_encoder is not supported on the WebUI's loaded {family} model: its OpenCLIP text encoder fuses "
    "q/k/v into one in_proj weight, which kohya-format LoRA files address as separate q/k/v modules. Set "
    "train_text_encoder to false to train the UNet only, or train from the checkpoint file with the CLI "
    "(diffusers host), which trains all text encoders."
)


class LdmBundle:
    """The WebUI's live ldm/sgm model behind the ModelBundle interface; every module is the host's own."""

    # the trainer must not re-layout these weights (channels_last would copy the whole UNet)
    shares_host_weights = True

    def __init__(
        self,
        sd_model: Any,
        clip_skip: int = 1,
        model_name: str | None = None,
        parameterization: Parameterization | None = None,
    ):
        self.sd_model = sd_model
        self.family: Family = detect_family(sd_model)
        self.unet: nn.Module = sd_model.model.diffusion_model
        if getattr(self.unet, "in_channels", 4) != getattr(self.unet, "out_channels", 4):
            raise ValueError(
                f"the WebUI's model takes {self.unet.in_channels} input channels (an inpainting/instruct model); "
                "load a regular SD1/SD2/SDXL checkpoint to train a LoRA"
            )
        self.vae: nn.Module = sd_model.first_stage_model
        self.scale_factor = float(sd_model.scale_factor)
        self.clip_skip = clip_skip
        self.parameterization: Parameterization = parameterization or self._parameterization()
        schedule = getattr(sd_model, "alphas_cumprod_original", None)
        if schedule is None:
            schedule = sd_model.alphas_cumprod
        self.alphas_cumprod = torch.as_tensor(schedule).detach().to("cpu", torch.float32).clone()
        self.model_name = model_name or self._model_name()
        self.gradient_checkpointing = False
        blocks = self.unet.num_res_blocks
        self.layers_per_block = int(blocks if isinstance(blocks, int) else blocks[0])
        if self.family != "sdxl" and not isinstance(blocks, int) and len(set(blocks)) != 1:
            raise ValueError(f"UNet has {list(blocks)} res blocks per level; kohya names need the same number")
        if self.family == "sdxl":
            self.embedders = [inner(e) for e in sd_model.conditioner.embedders]
            self.text_embedders = [e for e in self.embedders if is_hf_clip(e) or is_open_clip(e)]
            self._check_sdxl_embedders()
        else:
            self.embedders = [inner(sd_model.cond_stage_model)]
            self.text_embedders = self.embedders
        self.text_encoders: list[nn.Module] = [
            e.transformer if is_hf_clip(e) else e.model for e in self.text_embedders
        ]
        # Text-encoder LoRA needs separate q/k/v Linears: HF CLIP has them, OpenCLIP fuses them.
        self.supports_text_encoder_lora = all(is_hf_clip(e) for e in self.text_embedders)
        self.text_encoder_note = (
            None if self.supports_text_encoder_lora else TEXT_ENCODER_NOTE.format(family=self.family.upper())
        )
        self._blocks = [
            (module, "checkpoint" if hasattr(module, "checkpoint") else "use_checkpoint")
            for module in self.unet.modules()
            if callable(getattr(module, "_forward", None))
            and isinstance(getattr(module, "checkpoint", getattr(module, "use_checkpoint", None)), bool)
        ]

    # -- what the object says about itself --------------------------------------------------------------------
    def _parameterization(self) -> Parameterization:
        value = getattr(self.sd_model, "parameterization", "eps")
        if value not in ("eps", "v"):
            raise ValueError(f"the WebUI's model predicts {value!r}; only 'eps' and 'v' models can be trained")
        return value

    def _model_name(self) -> str:
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        for attr in ("name_for_extra", "model_name", "name"):
            if info is not None and getattr(info, attr, None):
                return str(getattr(info, attr))
        checkpoint = getattr(self.sd_model, "sd_model_checkpoint", None)
        return Path(checkpoint).stem if checkpoint else f"webui-{self.family}"

    def _check_sdxl_embedders(self) -> None:
        text_seen, size_seen = 0, False
        for embedder in self.embedders:
            if embedder in self.text_embedders:
                if size_seen:
                    raise ValueError("SDXL conditioner: text embedders must come before the size embedders")
                text_seen += 1
            elif getattr(embedder, "input_key", None) in SIZE_KEYS:
                size_seen = True
            else:
                key = getattr(embedder, "input_key", type(embedder).__name__)
                raise ValueError(f"SDXL conditioner input {key!r} is not supported (is this the SDXL refiner?)")
        if text_seen != 2:
            raise ValueError(f"SDXL conditioner has {text_seen} text encoders; SDXL base has two")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # -- text ---------------------------------------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        """Token ids per text encoder with the host's own tokenizers (HF for CLIP, open_clip for OpenCLIP)."""
        tokens = []
        for embedder, encoder in zip(self.text_embedders, self.text_encoders, strict=True):
            device = next(encoder.parameters()).device
            if is_hf_clip(embedder):
                ids = embedder.tokenizer(
                    captions, truncation=True, max_length=getattr(embedder, "max_length", MAX_LENGTH),
                    padding="max_length", return_tensors="pt",
                ).input_ids
            else:
                import open_clip  # the WebUI always has it when an OpenCLIP model is loaded

                ids = open_clip.tokenize(captions)
            tokens.append(ids.to(device))
        return tokens

    def encode_text(self, tokens: list[torch.Tensor]) -> Conditioning:
        contexts, pooled = [], []
        for embedder, ids in zip(self.text_embedders, tokens, strict=True):
            if is_hf_clip(embedder):
                context, pool = self._encode_hf(embedder, ids)
            else:
                context, pool = self._encode_open_clip(embedder, ids)
            contexts.append(context)
            if pool is not None:
                pooled.append(pool)
        if self.family != "sdxl":
            return Conditioning(context=contexts[0])
        return Conditioning(context=torch.cat(contexts, dim=-1), pooled=torch.cat(pooled, dim=-1))

    def _encode_hf(self, embedder: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = getattr(embedder, "layer", "last")
        skip = self.clip_skip if self.family == "sd1" else 1
        out = embedder.transformer(input_ids=ids, output_hidden_states=layer == "hidden" or skip > 1)
        if skip > 1:  # A1111's "Clip skip": an earlier layer through the final layer norm
            context = embedder.transformer.text_model.final_layer_norm(out.hidden_states[-skip])
        elif layer == "last":
            context = out.last_hidden_state
        elif layer == "pooled":
            context = out.pooler_output[:, None, :]
        else:
            context = out.hidden_states[embedder.layer_idx]
        pooled = out.pooler_output if getattr(embedder, "return_pooled", False) else None
        return context, pooled

    def _encode_open_clip(self, embedder: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The embedder's own code: ldm (SD2) returns the chosen layer through ln_final; sgm (SDXL, non-legacy)
        # returns a dict with the penultimate layer and the pooled, projected end-of-text features.
        out = embedder.encode_with_transformer(ids)
        if isinstance(out, dict):
            return out[embedder.layer], out.get("pooled") if getattr(embedder, "return_pooled", True) else None
        return out, None

    # -- images ---------------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_finite(self.vae, self._encode, pixels)  # fp32 where the half-precision VAE overflows

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if hasattr(vae, "encoder") and hasattr(vae, "quant_conv"):
            mean = vae.quant_conv(vae.encoder(pixels)).chunk(2, dim=1)[0]
            return mean * self.scale_factor
        # Other first stages: the host's own path (ldm returns a distribution, sgm already scales).
        encoded = self.sd_model.encode_first_stage(pixels)
        if hasattr(encoded, "mode"):
            return encoded.mode() * self.scale_factor
        return encoded

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        latents = latents.to(next(vae.parameters()).device, next(vae.parameters()).dtype)
        return vae.decode(latents * (1.0 / self.scale_factor))  # as ldm/sgm decode_first_stage: same bits

    # -- the UNet -------------------------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {}
        if self.family == "sdxl":
            kwargs["y"] = self.vector(cond, noisy)
        with self._checkpoint_mode(), self._autocast():
            return self.unet(noisy, timesteps, context=cond.context, **kwargs)

    def _autocast(self) -> Any:
        """fp16/bf16 host weights (the WebUI's default) need autocast: ldm's timestep embedding is fp32. The
        trainer normally provides it; this is the safety net when it does not (mixed_precision "no")."""
        device_type = self.device.type
        if self.dtype == torch.float32 or _autocast_enabled(device_type):
            return nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def vector(self, cond: Conditioning, noisy: torch.Tensor) -> torch.Tensor:
        """SDXL's ``y``: pooled text features, then each size embedder on its (h, w) / (top, left) pair."""
        if cond.pooled is None:
            raise ValueError("SDXL needs the pooled text embedding (Conditioning.pooled)")
        size_ids = cond.size_ids
        if size_ids is None:  # uncropped, original size = target size = the latent's size in pixels
            height, width = (s * self._vae_factor() for s in noisy.shape[-2:])
            size_ids = torch.tensor([[height, width, 0, 0, height, width]] * noisy.shape[0])
        size_ids = size_ids.to(cond.pooled.device, torch.float32)
        parts = [cond.pooled]
        for embedder in self.embedders:
            key = getattr(embedder, "input_key", None)
            if key in SIZE_KEYS:
                start = 2 * SIZE_KEYS.index(key)
                parts.append(embedder(size_ids[:, start : start + 2]).to(cond.pooled.dtype))
        return torch.cat(parts, dim=-1)

    def _vae_factor(self) -> int:
        levels = getattr(getattr(self.vae, "encoder", None), "num_resolutions", 4)
        return 2 ** (levels - 1)

    @contextmanager
    def _checkpoint_mode(self) -> Iterator[None]:
        """For one forward: torch's non-reentrant checkpointing when enabled and grads are on; otherwise turn
        off ldm's own ``checkpoint`` flag (its autograd function differentiates every block parameter and
        fails when the host's are frozen). Every attribute is put back before returning."""
        use_torch = self.gradient_checkpointing and torch.is_grad_enabled()
        changed: list[tuple[nn.Module, str, bool]] = []
        try:
            for module, flag in self._blocks:
                if use_torch:
                    module.forward = functools.partial(_checkpointed, module._forward)
                    changed.append((module, "forward", False))
                elif getattr(module, flag):
                    setattr(module, flag, False)
                    changed.append((module, flag, True))
            yield
        finally:
            for module, name, value in changed:
                if name == "forward":
                    del module.forward
                else:
                    setattr(module, name, value)

    def lora_targets(self, text_encoder: bool, conv: bool = False) -> list[LoraTarget]:
        """kohya's default targets in the UNet's transformers (and SD1's CLIP layers when asked); ``conv`` adds
        the ResBlocks and down/upsamplers (LoCon).

        Raises ValueError naming train_text_encoder when text-encoder LoRA is asked for an OpenCLIP model
        (SD2, SDXL): a silently UNet-only run would not be what the user asked for.
        """
        if text_encoder and not self.supports_text_encoder_lora:
            raise ValueError(self.text_encoder_note)
        return kohya_names.find_targets(
            self.unet, self.text_encoders, self.family, "ldm", self.layers_per_block, text_encoder, conv
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recorded only; ``predict`` applies it around each UNet call (text encoders are not checkpointed)."""
        self.gradient_checkpointing = enabled


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 (the WebUI's 2.1): no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _checkpointed(function: Any, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
