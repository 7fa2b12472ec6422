"""Tiny SD1.5 and SDXL models as lllyasviel's Forge 2 (and Neo) hold them: ``backend/`` shapes at dfdcbab6, no
Forge import.

- The engine is an object of a class named ``StableDiffusion`` in module ``backend.diffusion_engine.sd15`` (no
  nn.Module; SDXL: ``StableDiffusionXL`` with two text engines and the size ``embedder``) with ``forge_objects`` /
  ``forge_objects_original`` / ``forge_objects_after_applying_lora``,
  ``current_lora_hash``, ``text_processing_engine`` and ``sd_checkpoint_info``.
- ``forge_objects.unet`` is a ModelPatcher over a KModel (``diffusion_model``, ``predictor`` with
  ``alphas_cumprod`` and ``prediction_type``, ``storage_dtype``): the UNet is ldm's UNetModel (the same LDM names as
  backend/nn/unet.py) with backend's transformer block, which adds residuals in place (``x += n``).
- Every Linear is ``ForgeOperations.Linear`` of ``backend.operations``: an nn.Module, not an nn.Linear.
- The text encoder is an HF CLIPTextModel inside an IntegratedCLIP in a ``JointTextEncoder`` (``clip_l``); its token
  embedding sits inside the textual-inversion wrapper, which registers the same weight again.
- The LoRA loader (backend/patcher/lora.py ``LoraLoader``): one per model, ``refresh`` under inference mode puts the
  backups back, then replaces each patched weight by a new Parameter holding the merged clone.
- The memory manager's ``load_models_gpu`` unloads loaded clones of a patcher's model and calls ``refresh_loras``
  when it loads one (``LoadedModel.model_load``); ``model_accelerated`` marks a model streamed from CPU memory.
- ``forge_load`` turns every weight into an inference tensor, as ``forge_loader`` under ``torch.inference_mode()``.
"""

from __future__ import annotations

from types import SimpleNamespace

import ldm_models as M
import torch
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.attention import BasicTransformerBlock as LdmBlock
from ldm.modules.diffusionmodules.util import make_beta_schedule, timestep_embedding
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from torch import nn
from torch.nn import functional as F  # noqa: N812
from transformers import CLIPTextConfig, CLIPTextModel

from lora_train.hosts.clip_tokenizer import build_clip_tokenizer


class BasicTransformerBlock(LdmBlock):
    """backend/nn/unet.py's block: residuals added in place."""

    def _forward(self, x, context=None, transformer_options=None):
        n = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        x += n
        n = self.attn2(self.norm2(x), context=context)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


BasicTransformerBlock.__module__ = "backend.nn.unet"


class ForgeOperations:
    class Linear(nn.Module):
        """backend/operations.py: weight and bias as Parameters, F.linear in forward, not an nn.Linear."""

        def __init__(self, in_features: int, out_features: int):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = None
            self.bias = None
            self.parameters_manual_cast = False

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)


ForgeOperations.__module__ = ForgeOperations.Linear.__module__ = "backend.operations"


def _forge_linears(model: nn.Module) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                forge = ForgeOperations.Linear(child.in_features, child.out_features)
                forge.weight, forge.bias = child.weight, child.bias
                setattr(module, child_name, forge)


class CLIPEmbeddingForTextualInversion(nn.Module):
    """backend/text_processing/classic_engine.py: wraps the token embedding and registers its weight again."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class PromptChunk:
    def __init__(self, tokens: list[int]):
        self.tokens, self.multipliers, self.fixes = tokens, [1.0] * len(tokens), []


class ClassicTextProcessingEngine:
    """What the bundle uses of backend/text_processing/classic_engine.py: 75-token chunks, process_tokens, __call__."""

    def __init__(self, text_encoder: nn.Module, tokenizer, clip_skip: int = 1, minimal_clip_skip: int = 1,
                 final_layer_norm: bool = True, return_pooled: bool = False, text_projection: bool = False,
                 key: str = "clip_l"):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.embeddings = SimpleNamespace(fixes=None)
        self.clip_skip, self.minimal_clip_skip = clip_skip, minimal_clip_skip
        self.final_layer_norm, self.return_pooled = final_layer_norm, return_pooled
        self.text_projection, self.embedding_key = text_projection, key
        self.id_start, self.id_end, self.id_pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def empty_chunk(self) -> PromptChunk:
        return PromptChunk([self.id_start] + [self.id_end] * 76)

    def process_texts(self, texts: list[str]):
        batch = []
        for text in texts:
            ids = self.tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"]
            pieces = [ids[i : i + 75] for i in range(0, max(len(ids), 1), 75)]
            batch.append([PromptChunk([self.id_start] + p + [self.id_end] * (76 - len(p))) for p in pieces])
        return batch, max(len(ids) for ids in batch)

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        embeddings = self.text_encoder.transformer.text_model.embeddings  # Forge's: fp32 embeddings from here on
        embeddings.position_embedding = embeddings.position_embedding.to(dtype=torch.float32)
        outputs = self.text_encoder.transformer(tokens, output_hidden_states=True)
        z = outputs.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if self.final_layer_norm:
            z = self.text_encoder.transformer.text_model.final_layer_norm(z)
        if self.return_pooled:
            pooled = outputs.pooler_output
            if self.text_projection and self.embedding_key != "clip_l":
                pooled = self.text_encoder.transformer.text_projection(pooled)
            z.pooled = pooled
        return z

    def process_tokens(self, rows: list[list[int]], multipliers: list[list[float]]) -> torch.Tensor:
        tokens = torch.asarray(rows)
        if self.id_end != self.id_pad:
            for i, row in enumerate(rows):
                tokens[i, row.index(self.id_end) + 1 :] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        original_mean = z.mean()  # emphasis "Original"
        z = z * torch.asarray(multipliers).to(z)[..., None]
        z = z * (original_mean / z.mean())
        if pooled is not None:
            z.pooled = pooled
        return z

    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch, _ = self.process_texts(texts)
        count = max(len(chunks) for chunks in batch)
        zs = []
        for i in range(count):
            chunks = [c[i] if i < len(c) else self.empty_chunk() for c in batch]
            zs.append(self.process_tokens([c.tokens for c in chunks], [c.multipliers for c in chunks]))
        return (torch.hstack(zs), zs[0].pooled) if self.return_pooled else torch.hstack(zs)


class IntegratedAutoencoderKL(nn.Module):
    """backend/nn/vae.py: encode(x, regulation) over the posterior, process_in/out with the scaling factor."""

    def __init__(self, ldm_vae: nn.Module, scaling_factor: float = 0.18215):
        super().__init__()
        self.encoder, self.decoder = ldm_vae.encoder, ldm_vae.decoder
        self.quant_conv, self.post_quant_conv = ldm_vae.quant_conv, ldm_vae.post_quant_conv
        self.scaling_factor, self.shift_factor = scaling_factor, 0.0

    def encode(self, x, regulation=None):
        posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        return regulation(posterior) if regulation is not None else posterior.sample()

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return latent / self.scaling_factor + self.shift_factor


class Prediction(nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.prediction_type = "epsilon"
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())


class KModel(nn.Module):
    def __init__(self, unet: nn.Module, predictor: nn.Module):
        super().__init__()
        self.diffusion_model, self.predictor = unet, predictor
        self.storage_dtype = self.computation_dtype = torch.float32


def _get(model: nn.Module, key: str):
    return model.get_submodule(key.rpartition(".")[0]), key.rpartition(".")[2]


class LoraLoader:
    """backend/patcher/lora.py LoraLoader: restore the backups, then merge every patch into a new Parameter."""

    def __init__(self, model: nn.Module):
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    @torch.inference_mode()
    def refresh(self, lora_patches: dict) -> None:
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        for key, weight in self.backup.items():
            module, name = _get(self.model, key)
            setattr(module, name, weight)
        self.backup = {}
        for patches in lora_patches.values():
            for key, delta in patches.items():
                module, name = _get(self.model, key)
                weight = getattr(module, name)
                self.backup.setdefault(key, weight)
                setattr(module, name, nn.Parameter(weight.clone() + delta, requires_grad=False))
        self.loaded_hash = hashes


class ModelPatcher:
    def __init__(self, model: nn.Module):
        self.model, self.lora_patches = model, {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self) -> ModelPatcher:
        clone = ModelPatcher(self.model)
        clone.lora_patches = dict(self.lora_patches)
        return clone

    def add_patches(self, filename: str, patches: dict) -> None:
        self.lora_patches[(filename, 1.0, 1.0, False)] = patches

    def refresh_loras(self) -> None:
        self.lora_loader.refresh(self.lora_patches)


class MemoryManagement:
    """backend/memory_management.py: loading a patcher unloads the loaded clones of its model, then refreshes it."""

    def __init__(self) -> None:
        self.current_loaded_models: list[SimpleNamespace] = []

    def load_models_gpu(self, patchers: list[ModelPatcher]) -> None:
        for patcher in patchers:
            if any(loaded.model is patcher for loaded in self.current_loaded_models):
                continue
            self.current_loaded_models = [m for m in self.current_loaded_models if m.model.model is not patcher.model]
            patcher.refresh_loras()
            self.current_loaded_models.insert(0, SimpleNamespace(model=patcher, model_accelerated=False))


class ForgeObjects(SimpleNamespace):
    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(**vars(self))


def _backend_unet(unet: nn.Module) -> nn.Module:
    for module in unet.modules():
        if type(module) is LdmBlock:
            module.__class__ = BasicTransformerBlock
        for flag in ("checkpoint", "use_checkpoint"):
            if isinstance(getattr(module, flag, None), bool):
                setattr(module, flag, False)  # backend's checkpoint() raises when on
    _forge_linears(unet)
    return unet


def _integrated_clip(transformer: nn.Module, projection: bool = False) -> nn.Module:
    """backend/nn/clip.py IntegratedCLIP (``.transformer``, SDXL's G with a ``text_projection`` Linear), with the
    textual-inversion wrapper and fp16 embeddings the engine turns to fp32 at its first encoding."""
    clip = nn.Module()
    clip.transformer = transformer
    if projection:
        hidden = transformer.config.hidden_size
        transformer.text_projection = nn.Linear(hidden, hidden, bias=False)
    embeddings = transformer.text_model.embeddings
    embeddings.token_embedding = CLIPEmbeddingForTextualInversion(embeddings.token_embedding)
    embeddings.position_embedding.half()
    _forge_linears(clip)
    return clip


class _Engine:
    """What every backend engine has: forge_objects over KModel, JointTextEncoder and VAE, the LoRA hash."""

    is_sd1 = is_sdxl = is_inpaint = False

    def _assemble(self, unet: nn.Module, alphas_cumprod: torch.Tensor, text_encoders: dict, ldm_vae: nn.Module,
                  scaling_factor: float) -> None:
        kmodel = KModel(_backend_unet(unet), Prediction(alphas_cumprod))
        joint = nn.ModuleDict(text_encoders)
        vae = IntegratedAutoencoderKL(ldm_vae, scaling_factor)
        self.forge_objects = ForgeObjects(
            unet=ModelPatcher(kmodel),
            clip=SimpleNamespace(cond_stage_model=joint, patcher=ModelPatcher(joint)),
            vae=SimpleNamespace(first_stage_model=vae, patcher=ModelPatcher(vae)),
            clipvision=None,
        )
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.sd_checkpoint_info = SimpleNamespace(name_for_extra=f"forge2-tiny-{type(self).__name__}")

    def modules(self) -> list[nn.Module]:
        objects = self.forge_objects
        return [objects.unet.model, objects.clip.cond_stage_model, objects.vae.first_stage_model]


class StableDiffusion(_Engine):
    """backend/diffusion_engine/sd15.py's engine (not an nn.Module)."""

    is_sd1 = True

    def __init__(self, seed: int = 0) -> None:
        ldm = M.tiny_sd1(seed, webui=False)
        clip = _integrated_clip(ldm.cond_stage_model.transformer)
        self._assemble(ldm.model.diffusion_model, ldm.alphas_cumprod, {"clip_l": clip}, ldm.first_stage_model,
                       ldm.scale_factor)
        self.text_processing_engine = ClassicTextProcessingEngine(clip, ldm.cond_stage_model.tokenizer)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]) -> torch.Tensor:
        return self.text_processing_engine(prompt)



StableDiffusion.__module__ = "backend.diffusion_engine.sd15"


class Timestep(nn.Module):
    """backend/nn/unet.py Timestep: the sinusoidal embedding of each number."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class StableDiffusionXL(_Engine):
    """backend/diffusion_engine/sdxl.py: CLIP-L (penultimate layer, no final norm) and G (the same, plus the pooled
    output through ``text_projection``), the size vector from ``Timestep`` in get_learned_conditioning's order."""

    is_sdxl = True

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        unet = M.SDXLUNetModel(**M.SDXL_UNET)
        vae = AutoencoderKL(ddconfig=M.VAE_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).eval()
        clip_l = _integrated_clip(CLIPTextModel(CLIPTextConfig(**M.CLIP_CONFIG)))
        clip_g = _integrated_clip(CLIPTextModel(CLIPTextConfig(**M.CLIP_CONFIG)), projection=True)
        M._randomize(unet, seed)
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        alphas = torch.tensor((1 - betas).cumprod(axis=0), dtype=torch.float32)
        self._assemble(unet, alphas, {"clip_l": clip_l, "clip_g": clip_g}, vae, 0.13025)
        tokenizer = build_clip_tokenizer()
        common = dict(clip_skip=2, minimal_clip_skip=2, final_layer_norm=False)
        self.text_processing_engine_l = ClassicTextProcessingEngine(clip_l, tokenizer, **common)
        # Forge's tokenizer_2 (OpenCLIP's) pads with "!" (id 0), not with the end token
        self.text_processing_engine_g = ClassicTextProcessingEngine(clip_g, build_clip_tokenizer(pad_token="!"),
                                                                    return_pooled=True,
                                                                    text_projection=True, key="clip_g", **common)
        self.embedder = Timestep(M.SIZE_DIM)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]) -> dict[str, torch.Tensor]:
        cond_l = self.text_processing_engine_l(prompt)
        cond_g, clip_pooled = self.text_processing_engine_g(prompt)
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        out = [self.embedder(torch.Tensor([v])) for v in (height, width, 0, 0, height, width)]
        flat = torch.flatten(torch.cat(out)).unsqueeze(dim=0).repeat(clip_pooled.shape[0], 1).to(clip_pooled)
        return dict(crossattn=torch.cat([cond_l, cond_g], dim=2), vector=torch.cat([clip_pooled, flat], dim=1))


StableDiffusionXL.__module__ = "backend.diffusion_engine.sdxl"


class Flux(StableDiffusion):
    """Any engine the adapter does not train (backend/diffusion_engine/flux.py's class name)."""


Flux.__module__ = "backend.diffusion_engine.flux"


def forge_load(engine: StableDiffusion) -> StableDiffusion:
    """Every weight and buffer an inference tensor, as Forge's loader leaves them (Parameters, requires_grad on)."""
    with torch.inference_mode():
        for root in engine.modules():
            for module in root.modules():
                for tensor in list(module._parameters.values()):
                    if tensor is not None and not tensor.is_inference():
                        shared = [m for m in root.modules() if any(t is tensor for t in m._parameters.values())]
                        new = nn.Parameter(tensor.detach().clone())
                        for holder in shared:
                            for key, value in list(holder._parameters.items()):
                                if value is tensor:
                                    holder._parameters[key] = new
                for name, tensor in list(module._buffers.items()):
                    if tensor is not None and not tensor.is_inference():
                        module._buffers[name] = tensor.clone()
    return engine


PATCHED_KEY = "diffusion_model.out.2.weight"


def lora_generation(engine: StableDiffusion, manager: MemoryManagement) -> None:
    """What ``<lora:…>`` leaves behind: a UNet patcher clone with patches, loaded (merged) under inference mode."""
    with torch.inference_mode():
        weight = engine.forge_objects.unet.model.diffusion_model.out[2].weight
        clone = engine.forge_objects_original.unet.clone()
        clone.add_patches("/models/Lora/someone.safetensors", {PATCHED_KEY: torch.full_like(weight, 0.5)})
        engine.forge_objects.unet = clone
        engine.current_lora_hash = "[['/models/Lora/someone.safetensors', 1.0, 1.0, False]]"
        engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
        manager.load_models_gpu([clone])


def plain_generation(engine: StableDiffusion, manager: MemoryManagement) -> torch.Tensor:
    """One UNet call as a generation without ``<lora:…>`` makes it: original patchers loaded, inference mode."""
    with torch.inference_mode():
        if engine.current_lora_hash != str([]):  # networks.load_networks([]): the original patchers again
            engine.current_lora_hash = str([])
            engine.forge_objects_after_applying_lora = engine.forge_objects_original.shallow_copy()
        engine.forge_objects = engine.forge_objects_after_applying_lora.shallow_copy()
        manager.load_models_gpu([engine.forge_objects.unet])
        torch.manual_seed(1)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
        context = engine.text_processing_engine(["a photo of a cat"])
        return engine.forge_objects.unet.model.diffusion_model(x, t, context=context, transformer_options={}).clone()
