"""Tiny ldm models wrapped the way the WebUI holds them, for tests of hosts/ldm.py.

SD1 and SD2 are real ``ldm.models.diffusion.ddpm.LatentDiffusion`` objects (Stability's ``ldm`` from
stable-diffusion-sdkit) with the real UNetModel, AutoencoderKL, FrozenCLIPEmbedder and FrozenOpenCLIPEmbedder
classes at tiny sizes, random seeded weights and no download: the embedders are built around their
hub-loading ``__init__``.

SDXL needs Stability's ``sgm``, which no PyPI package ships. Its UNet is ldm's UNetModel subclassed with the
three things sgm's SDXL UNet adds (per-level transformer depth, a middle depth, the "sequential" label embedding
of the vector ``y``) under sgm's module names; its engine, OpenCLIP-bigG embedder and size embedders are small
stand-ins that copy sgm's code paths, cited where they are.

On top, the WebUI's wrapping: sd_hijack puts each text embedder inside a module with ``.wrapped`` and the
token embedding inside ``EmbeddingsWithFixes(.wrapped)``; for SDXL ``extend_sdxl`` sets ``parameterization``,
``alphas_cumprod`` and ``conditioner.wrapped``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.models.diffusion.ddpm import LatentDiffusion  # noqa: E402
from ldm.modules.attention import SpatialTransformer  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from ldm.modules.diffusionmodules.util import linear, make_beta_schedule, timestep_embedding  # noqa: E402
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lora_train.hosts.clip_tokenizer import build_clip_tokenizer  # noqa: E402

# 4 levels like SD's VAE (latents are 1/8 of the image), 32 channels because ldm's GroupNorm has 32 groups.
VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
}
CLIP_CONFIG = {
    "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
}
# SD1 layout: attention at the first level only (the real one: first three of four), 2 res blocks per level
# (the WebUI's kohya-name rules hard-code 2), 1x1-conv proj_in/out, checkpoint flags on as in v1-inference.yaml.
SD1_UNET = {
    "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
    "num_res_blocks": 2, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
    "transformer_depth": 1, "context_dim": 32, "use_checkpoint": True, "legacy": False,
}
# SD2 (v2-inference-v.yaml): head channels instead of head count, Linear proj_in/out, OpenCLIP context.
SD2_UNET = {
    **{k: v for k, v in SD1_UNET.items() if k != "num_heads"},
    "num_head_channels": 16, "use_linear_in_transformer": True,
}
# SDXL (sd_xl_base.yaml): no attention at the first level, depth per level, middle depth = last level's,
# context = CLIP-L hidden + bigG hidden, y = bigG pooled + 6 size embeddings. Sizes scaled down; the size
# embedding is 8 wide instead of 256.
SIZE_DIM = 8
SDXL_UNET = {
    "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [2],
    "num_res_blocks": 2, "channel_mult": [1, 2], "num_head_channels": 16, "use_spatial_transformer": True,
    "use_linear_in_transformer": True, "transformer_depth": [1, 2], "transformer_depth_middle": 2,
    "context_dim": 64, "adm_in_channels": 32 + 6 * SIZE_DIM, "num_classes": "sequential",
    "use_checkpoint": True, "legacy": False,
}


# ------------------------------------------------------------------------------------------- WebUI wrapping
class EmbeddingsWithFixes(nn.Module):
    """As sd_hijack.EmbeddingsWithFixes: the token embedding moved to ``.wrapped`` (textual inversion hook)."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.fixes = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wrapped(input_ids)


class CustomWordsWrapper(nn.Module):
    """As sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords / sd_hijack_open_clip's: the embedder in ``.wrapped``."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.tokenizer = getattr(wrapped, "tokenizer", None)


def hijack_hf(embedder: FrozenCLIPEmbedder) -> CustomWordsWrapper:
    embeddings = embedder.transformer.text_model.embeddings
    embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding)
    return CustomWordsWrapper(embedder)


def hijack_open_clip(embedder: FrozenOpenCLIPEmbedder) -> CustomWordsWrapper:
    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding)
    return CustomWordsWrapper(embedder)


# ----------------------------------------------------------------------------------------------- embedders
def frozen_clip(layer: str = "last", layer_idx: int | None = None, config: dict | None = None) -> FrozenCLIPEmbedder:
    """ldm's FrozenCLIPEmbedder around a tiny CLIPTextModel (its __init__ would download openai's weights)."""
    embedder = FrozenCLIPEmbedder.__new__(FrozenCLIPEmbedder)
    nn.Module.__init__(embedder)
    embedder.tokenizer = build_clip_tokenizer()
    embedder.transformer = CLIPTextModel(CLIPTextConfig(**(config or CLIP_CONFIG)))
    embedder.device, embedder.max_length, embedder.layer, embedder.layer_idx = "cpu", 77, layer, layer_idx
    embedder.freeze()
    return embedder


def tiny_open_clip(width: int = 32, layers: int = 2, heads: int = 2, embed_dim: int = 32) -> nn.Module:
    """An open_clip CLIP with a tiny text tower; the vision tower is deleted as ldm's embedder does."""
    model = open_clip.model.CLIP(
        embed_dim,
        open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers),
    )
    del model.visual
    return model


def frozen_open_clip(cls: type = FrozenOpenCLIPEmbedder, layer: str = "penultimate") -> FrozenOpenCLIPEmbedder:
    """ldm's FrozenOpenCLIPEmbedder (SD2) around a tiny open_clip model (its __init__ downloads ViT-H)."""
    embedder = cls.__new__(cls)
    nn.Module.__init__(embedder)
    embedder.model = tiny_open_clip()
    embedder.device, embedder.max_length, embedder.layer = "cpu", 77, layer
    embedder.layer_idx = {"last": 0, "penultimate": 1}[layer]
    embedder.freeze()
    return embedder


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's bigG embedder: ldm's class with sgm's non-legacy code (generative-models,
    sgm/modules/encoders/modules.py, FrozenOpenCLIPEmbedder2): penultimate layer without ln_final, pooled
    = ln_final(last) at the end-of-text token @ text_projection."""

    input_key = "txt"
    return_pooled = True
    legacy = False

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text)
        x = x + self.model.positional_embedding
        x = x.permute(1, 0, 2)
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        o = self.model.ln_final(x["last"])
        x["pooled"] = o[torch.arange(o.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection
        return x

    def text_transformer_forward(self, x, attn_mask=None):
        outputs = {}
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = r(x, attn_mask=attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        return outputs


class ConcatTimestepEmbedderND(nn.Module):
    """sgm's size embedder: every number of the (h, w) pair → a sinusoidal embedding, concatenated."""

    def __init__(self, outdim: int, input_key: str):
        super().__init__()
        self.outdim, self.input_key, self.ucg_rate = outdim, input_key, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        batch, dims = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(batch, dims * self.outdim)


# ---------------------------------------------------------------------------------------------------- UNets
class SDXLSpatialTransformer(SpatialTransformer):
    """ldm's SpatialTransformer with sgm's forward, which gives one context to every block of a deep stack."""

    def forward(self, x, context=None):
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        return super().forward(x, context)


class SDXLUNetModel(UNetModel):
    """ldm's UNetModel plus sgm's SDXL options: ``transformer_depth`` per level, ``transformer_depth_middle``
    and ``num_classes="sequential"`` with ``adm_in_channels`` (label_emb.0.0 / label_emb.0.2). ldm's
    SpatialTransformer is rebuilt at the right depth in place, so every module keeps sgm's name."""

    def __init__(self, *, transformer_depth, transformer_depth_middle, adm_in_channels, num_classes, **kwargs):
        super().__init__(transformer_depth=1, **kwargs)
        levels = len(self.channel_mult)
        index, inputs = 1, {}
        for level in range(levels):
            for _ in range(self.num_res_blocks[level]):
                inputs[index] = level
                index += 1
            index += level != levels - 1
        outputs = [lvl for lvl in reversed(range(levels)) for _ in range(self.num_res_blocks[lvl] + 1)]
        for blocks, level_of in ((self.input_blocks, inputs), (self.output_blocks, dict(enumerate(outputs)))):
            for i, block in enumerate(blocks):
                if len(block) > 1 and isinstance(block[1], SpatialTransformer):
                    block[1] = self._deeper(block[1], transformer_depth[level_of[i]], kwargs)
        self.middle_block[1] = self._deeper(self.middle_block[1], transformer_depth_middle, kwargs)
        self.num_classes = num_classes
        embed = self.model_channels * 4
        self.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, embed), nn.SiLU(), linear(embed, embed)))

    @staticmethod
    def _deeper(old: SpatialTransformer, depth: int, kwargs: dict) -> SpatialTransformer:
        heads = old.transformer_blocks[0].attn1.heads
        d_head = old.transformer_blocks[0].attn1.to_q.out_features // heads
        return SDXLSpatialTransformer(
            old.in_channels, heads, d_head, depth=depth, context_dim=[kwargs["context_dim"]] * depth,
            use_linear=kwargs.get("use_linear_in_transformer", False), use_checkpoint=kwargs["use_checkpoint"],
        )


def _randomize(model: nn.Module, seed: int) -> None:
    """Zero-initialised outputs (proj_out, the final conv) get random values too, so every layer matters."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


# ---------------------------------------------------------------------------------------------- the models
def _latent_diffusion(unet: dict, parameterization: str, scale_factor: float) -> LatentDiffusion:
    config = OmegaConf.create({
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": scale_factor, "use_ema": False, "parameterization": parameterization,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": VAE_DDCONFIG,
            "lossconfig": {"target": "torch.nn.Identity"},
        }},
        # replaced below: ldm's FrozenCLIPEmbedder/FrozenOpenCLIPEmbedder would download in __init__
        "cond_stage_config": {"target": "torch.nn.Identity"},
    })
    return LatentDiffusion(**config)


def original_config(unet: dict) -> dict:
    """The yaml's shape, as diffusers' create_unet_diffusers_config reads it."""
    return {"model": {"params": {"unet_config": {"params": dict(unet)},
                                 "first_stage_config": {"params": {"ddconfig": VAE_DDCONFIG}}}}}


def tiny_sd1(seed: int = 0, webui: bool = True) -> LatentDiffusion:
    """SD1.x as the WebUI holds it: FrozenCLIPEmbedder inside FrozenCLIPEmbedderWithCustomWords."""
    torch.manual_seed(seed)
    model = _latent_diffusion(SD1_UNET, "eps", 0.18215)
    embedder = frozen_clip()
    model.cond_stage_model = hijack_hf(embedder) if webui else embedder
    _randomize(model, seed)
    return model


def tiny_sd2(seed: int = 0, v: bool = True) -> LatentDiffusion:
    """SD2.x (768-v when ``v``): FrozenOpenCLIPEmbedder, penultimate layer, inside the WebUI's wrapper."""
    torch.manual_seed(seed)
    model = _latent_diffusion(SD2_UNET, "v" if v else "eps", 0.18215)
    model.cond_stage_model = hijack_open_clip(frozen_open_clip())
    _randomize(model, seed)
    return model


class SDXLEngine(nn.Module):
    """Stands in for sgm's DiffusionEngine after A1111's extend_sdxl() and sd_hijack (attribute names as there)."""

    is_sdxl = True

    def __init__(self, unet: nn.Module, vae: nn.Module, embedders: list[nn.Module], parameterization: str):
        super().__init__()
        self.model = nn.Module()  # sgm's OpenAIWrapper
        self.model.diffusion_model = unet
        self.model.conditioning_key = "crossattn"
        self.first_stage_model = vae
        self.conditioner = nn.Module()  # sgm's GeneralConditioner
        self.conditioner.embedders = nn.ModuleList(embedders)
        self.conditioner.wrapped = nn.Module()
        self.cond_stage_model = self.conditioner
        self.scale_factor = 0.13025
        self.parameterization = parameterization
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        self.alphas_cumprod = torch.tensor((1 - betas).cumprod(axis=0), dtype=torch.float32)

    @torch.no_grad()
    def encode_first_stage(self, x):  # sgm: the sample, already scaled
        return self.scale_factor * self.first_stage_model.encode(x).sample()

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)


def tiny_sdxl(seed: int = 0, parameterization: str = "eps") -> SDXLEngine:
    torch.manual_seed(seed)
    unet = SDXLUNetModel(**SDXL_UNET)
    vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).eval()
    clip_l = frozen_clip(layer="hidden", layer_idx=CLIP_CONFIG["num_hidden_layers"] - 1)
    clip_l.input_key = "txt"
    big_g = frozen_open_clip(FrozenOpenCLIPEmbedder2)
    sizes = [ConcatTimestepEmbedderND(SIZE_DIM, key) for key in
             ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    engine = SDXLEngine(unet, vae, [hijack_hf(clip_l), hijack_open_clip(big_g), *sizes], parameterization)
    _randomize(engine, seed)
    return engine


def unet_target_count(unet: dict) -> int:
    """kohya's UNet module count from the architecture: 2 projections + 10 Linears per transformer block."""
    depth = unet["transformer_depth"]
    depths = depth if isinstance(depth, list) else [depth] * len(unet["channel_mult"])
    middle = unet.get("transformer_depth_middle", depths[-1])
    blocks = unet["num_res_blocks"]
    total = 2 + 10 * middle
    for level, d in enumerate(depths):
        if 2**level in unet["attention_resolutions"]:
            total += (2 * blocks + 1) * (2 + 10 * d)
    return total
