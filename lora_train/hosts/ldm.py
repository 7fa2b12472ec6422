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

from lora_train.engine.data.prompt_chunks import PromptTokens, TokenRules, encode_chunks, hf_rules, tokenize_captions
from lora_train.engine.model import Conditioning, Family, LoraTarget, Parameterization, UnetPlacement
from lora_train.engine.network import fused_attention, kohya_names
from lora_train.hosts.ldm_embedders import detect_family, inner, is_hf_clip, is_open_clip
from lora_train.hosts.vae_fallback import encode_finite

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


class LdmBundle(UnetPlacement):
    """The WebUI's live ldm/sgm model behind the ModelBundle interface; every module is the host's own."""

    # the trainer must not re-layout these weights (channels_last would copy the whole UNet)
    shares_host_weights = True

    def __init__(
        self,
        sd_model: Any,
        clip_skip: int = 1,
        model_name: str | None = None,
        parameterization: Parameterization | None = None,
        sdxl_clip_l_skip: bool = False,
        zero_terminal_snr: bool = False,
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
        self.sdxl_clip_l_skip = sdxl_clip_l_skip
        self.zero_terminal_snr = zero_terminal_snr  # the WebUI samples with it ("Noise schedule for sampling")
        self._rules: list[TokenRules] | None = None
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
        return checkpoint_name(self.sd_model, self.family)

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

    # -- text ---------------------------------------------------------------------------------------------------
    def token_rules(self) -> list[TokenRules]:
        """Each text encoder's tokenizer and special ids as the WebUI's own embedder wrappers use them: HF CLIP
        pads with its end token, OpenCLIP with 0 (``sd_hijack_clip`` / ``sd_hijack_open_clip``)."""
        if self._rules is None:
            rules = []
            for embedder in self.text_embedders:
                if is_hf_clip(embedder):
                    rules.append(hf_rules(embedder.tokenizer, pad=embedder.tokenizer.eos_token_id))
                else:
                    from open_clip.tokenizer import _tokenizer  # the WebUI has it when an OpenCLIP model is loaded

                    vocab = _tokenizer.encoder
                    rules.append(TokenRules(_tokenizer.encode, vocab["<start_of_text>"], vocab["<end_of_text>"], 0,
                                            vocab.get(",</w>")))
            self._rules = rules
        return self._rules

    def tokenize(self, captions: list[str], max_chunks: int = 1, weighted: bool = False) -> PromptTokens:
        """Token ids per text encoder in the WebUI's 75-token chunks (see ``prompt_chunks``)."""
        tokens = tokenize_captions(captions, self.token_rules(), max_chunks, weighted=weighted)
        devices = [next(encoder.parameters()).device for encoder in self.text_encoders]
        return PromptTokens([ids.to(d) for ids, d in zip(tokens.ids, devices, strict=True)], tokens.multipliers)

    def encode_text(self, tokens: PromptTokens) -> Conditioning:
        contexts, pooled = [], []
        for embedder, ids, weights in zip(self.text_embedders, tokens.ids, tokens.multipliers, strict=True):
            encode = functools.partial(self._encode_hf if is_hf_clip(embedder) else self._encode_open_clip, embedder)
            context, pool = encode_chunks(ids, weights, encode)
            contexts.append(context)
            if pool is not None:
                pooled.append(pool)
        if self.family != "sdxl":
            return Conditioning(context=contexts[0])
        return Conditioning(context=torch.cat(contexts, dim=-1), pooled=torch.cat(pooled, dim=-1))

    def _encode_hf(self, embedder: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = getattr(embedder, "layer", "last")
        skip = self.clip_skip if self.family == "sd1" else 1
        sdxl_skip = self.family == "sdxl" and self.sdxl_clip_l_skip
        out = embedder.transformer(input_ids=ids, output_hidden_states=layer == "hidden" or skip > 1 or sdxl_skip)
        if skip > 1:  # A1111's "Clip skip": an earlier layer through the final layer norm
            context = embedder.transformer.text_model.final_layer_norm(out.hidden_states[-skip])
        elif sdxl_skip:  # A1111's "Clip skip SDXL": CLIP-L's layer -clip_skip, without the final norm
            context = out.hidden_states[-self.clip_skip]
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
        """kohya's default targets in the UNet's transformers and, when asked, every text encoder's layers; ``conv``
        adds the ResBlocks and down/upsamplers (LoCon). OpenCLIP's fused q/k/v become kohya's three modules
        (``fused_attention``), so SD2 files have 138 text modules and SDXL files 72 + 192, as kohya's."""
        hf_encoders = [e.transformer for e in self.text_embedders if is_hf_clip(e)]
        targets = kohya_names.find_targets(
            self.unet, hf_encoders, self.family, "ldm", self.layers_per_block, text_encoder, conv
        )
        if text_encoder:
            for index, embedder in enumerate(self.text_embedders):
                if not is_hf_clip(embedder):
                    targets += _open_clip_targets(embedder, self.family, index)
        return targets

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recorded only; ``predict`` applies it around each UNet call (text encoders are not checkpointed)."""
        self.gradient_checkpointing = enabled


def _open_clip_targets(embedder: nn.Module, family: Family, index: int) -> list[LoraTarget]:
    """kohya's q/k/v/out and mlp fc1/fc2 modules of each OpenCLIP layer the embedder runs: SD2's ldm embedder
    stops before the last ``layer_idx`` blocks (kohya's SD2 text encoder has 23 layers), SDXL's sgm embedder
    runs all (the last feeds the pooled vector)."""
    encoder = embedder.model
    blocks = encoder.transformer.resblocks
    used = len(blocks) if getattr(embedder, "legacy", True) is False else len(blocks) - int(embedder.layer_idx)
    targets = []
    for number, block in enumerate(blocks[:used]):
        prepare = functools.partial(fused_attention.split, block.attn)
        for part in (*fused_attention.PARTS, "out_proj"):
            path = f"transformer.resblocks.{number}.attn.{part}"
            key = kohya_names.text_encoder_key(path, family, index)
            targets.append(LoraTarget(encoder, path, key, prepare if part != "out_proj" else None))
        for part in ("c_fc", "c_proj"):
            path = f"transformer.resblocks.{number}.mlp.{part}"
            targets.append(LoraTarget(encoder, path, kohya_names.text_encoder_key(path, family, index)))
    return targets


def checkpoint_name(sd_model: Any, family: str) -> str:
    """The loaded checkpoint's name as the WebUI shows it (``sd_checkpoint_info``; every WebUI sets it)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    for attr in ("name_for_extra", "model_name", "name"):
        if info is not None and getattr(info, attr, None):
            return str(getattr(info, attr))
    checkpoint = getattr(sd_model, "sd_model_checkpoint", None)
    return Path(checkpoint).stem if checkpoint else f"webui-{family}"


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 (the WebUI's 2.1): no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _checkpointed(function: Any, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
