"""ModelBundle built with diffusers/transformers classes: the CLI's host.

Loads the built-in tiny models, diffusers folders and single-file .safetensors/.ckpt checkpoints fully
offline: configs come from ``architectures.py``, tokenizers from open_clip's vocab file, and the UNet/VAE
key conversion from diffusers' own single-file utilities.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data.prompt_chunks import PromptTokens, TokenRules, encode_chunks, hf_rules, tokenize_captions
from lora_train.engine.devices import frozen_dtype, pick_device
from lora_train.engine.model import Conditioning, Family, LoraTarget, Parameterization, UnetPlacement
from lora_train.engine.network import kohya_names
from lora_train.engine.output.weights import WeightsFileError
from lora_train.hosts import checkpoint_convert
from lora_train.hosts.architectures import BUILTIN, BY_FAMILY, Architecture
from lora_train.hosts.base_model import folder_family
from lora_train.hosts.clip_tokenizer import MAX_LENGTH, build_clip_tokenizer
from lora_train.hosts.hf_compat import set_checkpointing
from lora_train.hosts.vae_fallback import encode_finite


def sd_alphas_cumprod() -> torch.Tensor:
    """The 1000-step scaled-linear schedule every SD1/SD2/SDXL checkpoint was trained with."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class DiffusersBundle(UnetPlacement):
    """diffusers UNet + VAE + transformers CLIP text encoder(s) behind the ModelBundle interface."""

    def __init__(
        self,
        arch: Architecture,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: list[nn.Module],
        tokenizers: list[CLIPTokenizer],
        parameterization: Parameterization = "eps",
        model_name: str = "",
        clip_skip: int = 1,
        alphas_cumprod: torch.Tensor | None = None,
    ):
        self.arch = arch
        self.family: Family = arch.family
        self.unet = unet
        self.vae = vae
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.parameterization = parameterization
        self.model_name = model_name
        self.clip_skip = clip_skip
        self._rules: list[TokenRules] | None = None
        self.alphas_cumprod = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.scaling_factor = float(vae.config.scaling_factor)
        self.zero_terminal_snr = False  # what the model declares (a checkpoint's ztsnr key); the config decides

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusersBundle:
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device=device, dtype=dtype)
        return self

    def tokenize(self, captions: list[str], max_chunks: int = 1, weighted: bool = False) -> PromptTokens:
        """Token ids per text encoder in the WebUI's 75-token chunks (see ``prompt_chunks``)."""
        if self._rules is None:
            self._rules = [hf_rules(tok) for tok in self.tokenizers]
        tokens = tokenize_captions(captions, self._rules, max_chunks, weighted=weighted)
        return PromptTokens([ids.to(self.device) for ids in tokens.ids], tokens.multipliers)

    def encode_text(self, tokens: PromptTokens) -> Conditioning:
        if self.family == "sdxl":
            first, _ = encode_chunks(tokens.ids[0], tokens.multipliers[0], self._encode_sdxl_first)
            second, pooled = encode_chunks(tokens.ids[1], tokens.multipliers[1], self._encode_sdxl_second)
            return Conditioning(context=torch.cat([first, second], dim=-1), pooled=pooled)
        context, _ = encode_chunks(tokens.ids[0], tokens.multipliers[0], self._encode_single)
        return Conditioning(context=context)

    def _encode_single(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        encoder = self.text_encoders[0]
        if self.clip_skip == 1:
            return encoder(ids).last_hidden_state, None
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-self.clip_skip]
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 5: no text_model
        return final_norm(hidden), None

    def _encode_sdxl_first(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.text_encoders[0](ids, output_hidden_states=True).hidden_states[-2], None

    def _encode_sdxl_second(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoders[1](ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # The distribution's mean, not a sample: cached latents then do not depend on an RNG draw.
        latents = encode_finite(self.vae, lambda p: self.vae.encode(p).latent_dist.mean, pixels)
        return latents * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        extra = {}
        if self.family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.size_ids}
        return self.unet(noisy, timesteps, encoder_hidden_states=cond.context, **extra).sample

    def lora_targets(self, text_encoder: bool, conv: bool = False) -> list[LoraTarget]:
        return kohya_names.find_targets(
            self.unet, self.text_encoders, self.family, "diffusers", self.arch.layers_per_block, text_encoder, conv
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.text_encoders:
                set_checkpointing(encoder, True)
                # reentrant checkpointing only back-propagates into LoRA when the inputs require grad
                encoder.enable_input_require_grads()
        else:
            self.unet.disable_gradient_checkpointing()
            for encoder in self.text_encoders:
                set_checkpointing(encoder, False)


def _text_encoder(config: dict, with_projection: bool) -> nn.Module:
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def build_random(arch: Architecture, seed: int = 0, name: str = "") -> DiffusersBundle:
    """Randomly initialised modules of ``arch`` (the built-in tiny models; deterministic for a seed)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch.unet)
    vae = AutoencoderKL(**arch.vae)
    encoders = [
        _text_encoder(cfg, with_projection=arch.family == "sdxl" and i == 1)
        for i, cfg in enumerate(arch.text_encoders)
    ]
    tokenizers = [build_clip_tokenizer(pad) for pad in arch.pad_tokens]
    return DiffusersBundle(arch, unet, vae, encoders, tokenizers, model_name=name)


def load_single_file(
    path: str | Path, v_parameterization: bool | None = None, arch: Architecture | None = None, clip_skip: int = 1,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> DiffusersBundle:
    """An A1111-style single-file checkpoint (.safetensors or .ckpt) of SD1.x, SD2.x or SDXL.

    Each tensor is read, converted to ``dtype`` on ``device`` (default: as stored, on the CPU) and assigned in
    turn, so loading needs the model's memory plus about one tensor, not model + file.
    """
    path = Path(path)
    state, family = checkpoint_convert.read_state_dict(path, dtype, device)
    arch = arch or BY_FAMILY[family]
    if arch.family != family:
        raise WeightsFileError(f"{path}: weights are {family} but the architecture given is {arch.family}")
    with init_empty_weights():
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        encoders = [
            _text_encoder(cfg, with_projection=family == "sdxl" and i == 1) for i, cfg in enumerate(arch.text_encoders)
        ]
    checkpoint_convert.load_into(unet, checkpoint_convert.unet_state(state, unet.config, path), path, "UNet")
    checkpoint_convert.load_into(vae, checkpoint_convert.vae_state(state, vae.config, path), path, "VAE")
    for index, encoder in enumerate(encoders):
        what = f"text encoder {index + 1}"
        converted = checkpoint_convert.converted(path, what, checkpoint_convert.text_encoder_state, state, family,
                                                 index, encoder.config.num_hidden_layers)
        checkpoint_convert.load_into(encoder, converted, path, what)
    # NoobAI-style v-pred SDXL files mark themselves with empty ``v_pred`` and ``ztsnr`` tensors (what reForge and
    # ComfyUI read); A1111 wants a .yaml beside the file
    marked_v, marked_ztsnr = "v_pred" in state, "ztsnr" in state
    state.close()
    tokenizers = [build_clip_tokenizer(pad) for pad in arch.pad_tokens]
    parameterization = _parameterization(v_parameterization, checkpoint_convert.yaml_says_v(path) or marked_v)
    bundle = DiffusersBundle(arch, unet, vae, encoders, tokenizers, parameterization, path.name, clip_skip)
    bundle.zero_terminal_snr = marked_ztsnr
    return bundle


def load_folder(path: str | Path, v_parameterization: bool | None = None, clip_skip: int = 1) -> DiffusersBundle:
    """A diffusers-format model folder (model_index.json, unet/, vae/, text_encoder[_2]/ ...)."""
    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    family = folder_family(path)
    encoders: list[nn.Module] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)]
    if family == "sdxl":
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", local_files_only=True)
        )
    pads = BY_FAMILY[family].pad_tokens
    tokenizers = []
    for index, pad in enumerate(pads):
        folder = path / ("tokenizer" if index == 0 else "tokenizer_2")
        tokenizers.append(
            CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH) if folder.is_dir()
            else build_clip_tokenizer(pad)
        )
    alphas_cumprod, folder_v = folder_schedule(path)
    arch = Architecture(family, dict(unet.config), dict(vae.config), [e.config.to_dict() for e in encoders], pads)
    return DiffusersBundle(
        arch, unet, vae, encoders, tokenizers, _parameterization(v_parameterization, folder_v), path.name, clip_skip,
        alphas_cumprod,
    )


def folder_schedule(path: Path) -> tuple[torch.Tensor, bool]:
    """The noise schedule a diffusers folder was trained with, and whether it predicts v.

    Read from ``scheduler/`` with diffusers' DDPMScheduler (betas, ``rescale_betas_zero_snr``, trained_betas,
    prediction_type), so zero-terminal-SNR or v-prediction models train on their own schedule; a folder
    without one gets SD's default.
    """
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        return sd_alphas_cumprod(), False
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    prediction = scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise WeightsFileError(f"{path / 'scheduler'}: prediction_type {prediction!r} is not supported; "
                               "LoRA training here handles 'epsilon' and 'v_prediction' models")
    return scheduler.alphas_cumprod.float(), prediction == "v_prediction"


def _parameterization(user: bool | None, from_model: bool) -> Parameterization:
    """The user's explicit setting wins; otherwise what the model's config says; otherwise epsilon."""
    if user is not None:
        return "v" if user else "eps"
    return "v" if from_model else "eps"


def load_bundle(
    base_model: str, v_parameterization: bool | None = None, clip_skip: int = 1, seed: int = 0,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> DiffusersBundle:
    """Resolve ``base_model`` (``tiny``, ``tiny-sdxl``, a folder or a checkpoint file) to a bundle; a checkpoint
    file is read straight into ``dtype`` on ``device`` (the others are moved by the caller)."""
    if base_model in BUILTIN:
        bundle = build_random(BUILTIN[base_model], seed=seed, name=base_model)
        bundle.parameterization = _parameterization(v_parameterization, False)
        bundle.clip_skip = clip_skip
        return bundle
    path = Path(base_model).expanduser()
    if path.is_dir():
        return load_folder(path, v_parameterization, clip_skip)
    if path.is_file():
        return load_single_file(path, v_parameterization, clip_skip=clip_skip, device=device, dtype=dtype)
    raise FileNotFoundError(
        f"base_model {base_model!r}: no such file or folder; give a .safetensors/.ckpt checkpoint, a diffusers "
        f"folder, or one of the built-in models: {', '.join(BUILTIN)}"
    )


def load_model(cfg: TrainConfig) -> DiffusersBundle:
    """The bundle for ``cfg.base_model`` on the configured device: what ``train`` and the ``ui`` server train."""
    device = pick_device(cfg.device)
    dtype = frozen_dtype(cfg.mixed_precision, device)
    bundle = load_bundle(cfg.base_model, cfg.v_parameterization, cfg.clip_skip or 1, device=device, dtype=dtype)
    return bundle.to(device, dtype)
