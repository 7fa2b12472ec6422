"""The WebUI-host bundle (lora_train/hosts/ldm.py) on real ldm models built tiny (see tests/ldm_models.py).

What is shown: a LoRA trained in memory on the host's own modules is the same LoRA once written as a kohya
file and loaded by diffusers or resolved by the WebUI's name rules; every key lands; the host model is
bit-identical (tensors, requires_grad, train/eval, module tree) after a finished run, a stop and a crash; the
loss target follows the model's parameterization; the built-in Lora extension's in-place merge is undone.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (requirements/ldm-test.txt)")
pytest.importorskip("pytorch_lightning", reason="needs pytorch_lightning<2 (requirements/ldm-test.txt)")

import ldm_models as M  # noqa: E402
import torch  # noqa: E402
from conftest import make_config  # noqa: E402
from diffusers_compat import require_kohya_loader  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from lora_train.engine.model import Conditioning  # noqa: E402
from lora_train.engine.network import lora  # noqa: E402
from lora_train.engine.output.export import read_lora  # noqa: E402
from lora_train.engine.train import loss
from lora_train.engine.train.progress import TrainCallbacks  # noqa: E402
from lora_train.engine.train.sampler import sample_images  # noqa: E402
from lora_train.engine.train.trainer import train  # noqa: E402
from lora_train.hosts.ldm import LdmBundle  # noqa: E402
from lora_train.hosts.ldm_embedders import detect_family  # noqa: E402
from lora_train.webui.builtin_lora import reset_builtin_lora  # noqa: E402
from lora_train.webui.host_snapshot import HostSnapshot  # noqa: E402

CAPTIONS = ["a photo of a red cat", "a painting of a house by the sea"]
RANK, ALPHA = 4, 2.0


# ---------------------------------------------------------------------------------------------- helpers
def _batch(bundle: LdmBundle, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([37, 811])
    alpha = bundle.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    size_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 64, 16, 0, 64, 64]])
    return latents, noise, timesteps, noisy, size_ids


def _train(bundle: LdmBundle, text_encoder: bool, steps: int = 3, checkpointing: bool = False) -> lora.LoraNetwork:
    """A few AdamW steps of our own (the trainer's loop is exercised in the integrity tests)."""
    for module in (bundle.unet, *bundle.text_encoders):
        module.requires_grad_(False)
    torch.manual_seed(0)
    network = lora.inject(bundle.lora_targets(text_encoder), RANK, ALPHA, 0.0)
    lora.trainable(network.parameters(), True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-2)
    bundle.set_gradient_checkpointing(checkpointing)
    latents, noise, timesteps, noisy, size_ids = _batch(bundle)
    for _ in range(steps):
        cond = bundle.encode_text(bundle.tokenize(CAPTIONS))
        cond.size_ids = size_ids if cond.pooled is not None else None
        loss = nn.functional.mse_loss(bundle.predict(noisy, timesteps, cond), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    bundle.set_gradient_checkpointing(False)
    return network


def _kohya_file(network: lora.LoraNetwork, tmp_path: Path) -> dict[str, torch.Tensor]:
    path = tmp_path / "lora.safetensors"
    save_file(lora.kohya_state_dict(network, torch.float32), str(path))
    return load_file(str(path))


def _modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".", 1)[0] for key in tensors}


# ------------------------------------------------------------------ the WebUI's key rules, re-implemented
# extensions-builtin/Lora/networks.py (A1111 1.10): assign_network_names_to_compvis_modules names every module
# of sd_model.model and of the text encoder(s) with "." -> "_"; load_network maps a file key with
# convert_diffusers_name_to_compvis, then the fallbacks for SDXL ("lora_unet" -> "diffusion_model",
# "lora_te1_text_model" -> "0_transformer_text_model"); network_lora accepts Linear/Conv2d/MHA modules.
def _webui_layer_mapping(sd_model: nn.Module, family: str) -> dict[str, nn.Module]:
    mapping: dict[str, nn.Module] = {}
    if family == "sdxl":
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            if hasattr(embedder, "wrapped"):
                for name, module in embedder.wrapped.named_modules():
                    mapping[f"{i}_{name.replace('.', '_')}"] = module
    else:
        cond = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
        for name, module in cond.named_modules():
            mapping[name.replace(".", "_")] = module
    for name, module in sd_model.model.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping


def _convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + block * 3 + index}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{m[3]}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{block * 3 + index}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{m[1]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def webui_resolve(mapping: dict[str, nn.Module], family: str, key: str) -> nn.Module | None:
    module = mapping.get(_convert_diffusers_name_to_compvis(key, family == "sd2"))
    if module is None and "lora_unet" in key:
        module = mapping.get(key.replace("lora_unet", "diffusion_model"))
    elif module is None and "lora_te1_text_model" in key:
        module = mapping.get(key.replace("lora_te1_text_model", "0_transformer_text_model"))
    return module


def webui_merge(sd_model: nn.Module, family: str, tensors: dict[str, torch.Tensor]) -> int:
    """network_lora's calc_updown, done by hand: W += alpha / rank * up @ down. Returns modules merged."""
    merged, mapping = 0, _webui_layer_mapping(sd_model, family)
    with torch.no_grad():
        for key in _modules(tensors):
            module = webui_resolve(mapping, family, key)
            assert module is not None, f"the WebUI would not match {key}"
            assert type(module) in (nn.Linear, nn.Conv2d), f"{key}: {type(module).__name__} is not a LoRA type"
            up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
            scale = float(tensors[f"{key}.alpha"]) / down.shape[0]
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            module.weight += scale * delta.reshape(module.weight.shape)
            merged += 1
    return merged


# -------------------------------------------------------------------------------------- diffusers side
def diffusers_unet(ldm_unet: nn.Module, unet_params: dict, sdxl: bool = False):
    """The same weights as a diffusers UNet, through diffusers' own single-file conversion."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers_compat import create_unet_diffusers_config

    config = create_unet_diffusers_config(M.original_config(unet_params), image_size=64)
    if sdxl:  # diffusers recognises SDXL by context_dim 2048/1280; the tiny one is 64 wide with 8-wide size ids
        config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=M.SIZE_DIM)
    checkpoint = {f"model.diffusion_model.{k}": v.clone() for k, v in ldm_unet.state_dict().items()}
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config))
    return unet.eval()


def diffusers_text_encoder(host_clip: nn.Module):
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(**M.CLIP_CONFIG))
    state = {k.replace("token_embedding.wrapped.", "token_embedding."): v for k, v in host_clip.state_dict().items()}
    encoder.load_state_dict(state)
    return encoder.eval()


def _lora_layers(model: nn.Module) -> int:
    return sum(getattr(m, "lora_layer", None) is not None for m in model.modules())


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    scale = max(a.abs().max().item(), 1e-3)
    assert (a - b).abs().max().item() <= tol * scale, f"max diff {(a - b).abs().max().item():.3g} at scale {scale:.3g}"


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("build,family,param", [
    (M.tiny_sd1, "sd1", "eps"), (M.tiny_sd2, "sd2", "v"), (M.tiny_sdxl, "sdxl", "eps"),
])
def test_bundle_reads_the_host_object(build, family, param):
    from lora_train.hosts.diffusers import sd_alphas_cumprod

    model = build()
    bundle = LdmBundle(model)
    assert (bundle.family, bundle.parameterization) == (family, param)
    assert bundle.unet is model.model.diffusion_model  # zero copy
    assert bundle.text_encoders[0] in set(model.modules())
    assert torch.allclose(bundle.alphas_cumprod, sd_alphas_cumprod(), atol=1e-6)
    assert (bundle.dtype, bundle.device.type) == (torch.float32, "cpu")
    assert bundle.model_name == f"webui-{family}"


def test_sd1_without_the_webui_wrapper_and_clear_errors():
    plain = M.tiny_sd1(webui=False)
    assert detect_family(plain) == "sd1"
    assert LdmBundle(plain).text_encoders[0] is plain.cond_stage_model.transformer
    plain.parameterization = "x0"
    with pytest.raises(ValueError, match="'eps' and 'v'"):
        LdmBundle(plain)
    with pytest.raises(ValueError, match="not an SD model"):
        detect_family(nn.Module())


def test_text_and_images_match_the_hosts_own_code():
    sd1 = M.tiny_sd1()
    bundle = LdmBundle(sd1)
    inner = sd1.cond_stage_model.wrapped
    with torch.no_grad():
        assert torch.equal(bundle.encode_text(bundle.tokenize(CAPTIONS)).context, inner(CAPTIONS))
        skip2 = LdmBundle(sd1, clip_skip=2).encode_text(bundle.tokenize(CAPTIONS)).context
        hidden = inner.transformer(bundle.tokenize(CAPTIONS).ids[0], output_hidden_states=True).hidden_states[-2]
        assert torch.equal(skip2, inner.transformer.text_model.final_layer_norm(hidden))
        pixels = torch.rand(2, 3, 64, 64) * 2 - 1
        latents = bundle.encode_images(pixels)
        assert torch.allclose(latents, sd1.encode_first_stage(pixels).mode() * sd1.scale_factor)
        assert torch.allclose(bundle.decode_latents(latents), sd1.decode_first_stage(latents))

    sd2 = M.tiny_sd2()
    with torch.no_grad():
        context = LdmBundle(sd2).encode_text(LdmBundle(sd2).tokenize(CAPTIONS)).context
        assert torch.equal(context, sd2.cond_stage_model.wrapped(CAPTIONS))  # penultimate layer, ln_final

    sdxl = M.tiny_sdxl()
    bundle = LdmBundle(sdxl)
    clip_l, big_g = (e.wrapped for e in sdxl.conditioner.embedders[:2])
    with torch.no_grad():
        cond = bundle.encode_text(bundle.tokenize(CAPTIONS))
        g = big_g.encode_with_transformer(bundle.tokenize(CAPTIONS).ids[1])
        assert torch.equal(cond.context, torch.cat([clip_l(CAPTIONS), g["penultimate"]], dim=-1))
        assert torch.equal(cond.pooled, g["pooled"])
        assert cond.context.shape[-1] == M.SDXL_UNET["context_dim"]
        # no size ids: uncropped at the latent's pixel size
        y = bundle.vector(cond, torch.zeros(2, 4, 8, 8))
        cond.size_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
        assert torch.equal(y, bundle.vector(cond, torch.zeros(2, 4, 8, 8)))
        assert y.shape[-1] == M.SDXL_UNET["adm_in_channels"]


def _te_count(family: str) -> int:
    """kohya's text-encoder modules of the tiny models: 6 per CLIP layer; OpenCLIP (2 layers) all of SDXL's,
    SD2's without the last (its embedder stops at the penultimate)."""
    clip = 6 * M.CLIP_CONFIG["num_hidden_layers"]
    return {"sd1": clip, "sd2": 6 * (2 - 1), "sdxl": clip + 6 * 2}[family]


@pytest.mark.parametrize("build,unet,te_count", [
    (M.tiny_sd1, M.SD1_UNET, _te_count("sd1")), (M.tiny_sd2, M.SD2_UNET, _te_count("sd2")),
    (M.tiny_sdxl, M.SDXL_UNET, _te_count("sdxl")),
])
def test_lora_targets_and_kohya_names(build, unet, te_count):
    bundle = LdmBundle(build())
    targets = bundle.lora_targets(text_encoder=False)
    assert len(targets) == M.unet_target_count(unet) == len({t.kohya_key for t in targets})
    keys = [t.kohya_key for t in targets]
    if bundle.family == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in keys
        assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in keys
    else:
        assert "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q" in keys
        assert "lora_unet_up_blocks_1_attentions_2_proj_out" in keys
        assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in keys
    te = [t for t in bundle.lora_targets(text_encoder=True) if t.kohya_key.startswith("lora_te")]
    assert len(te) == te_count == len({t.kohya_key for t in te})
    last = "lora_te2_text_model_encoder_layers_1" if bundle.family == "sdxl" else "lora_te_text_model_encoder_layers_0"
    assert {f"{last}_mlp_fc2", f"{last}_self_attn_q_proj", f"{last}_self_attn_out_proj"} <= {t.kohya_key for t in te}


# The released configs (v1-inference.yaml, v2-inference-v.yaml, sd_xl_base.yaml), built on the meta device.
_FULL_SD1 = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "use_spatial_transformer": True,
    "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True, "legacy": False,
}
_FULL_SD2 = {**{k: v for k, v in _FULL_SD1.items() if k != "num_heads"}, "num_head_channels": 64,
             "use_linear_in_transformer": True, "context_dim": 1024}
_FULL_SDXL = {
    **{k: v for k, v in _FULL_SD2.items() if k != "transformer_depth"}, "attention_resolutions": [4, 2],
    "channel_mult": [1, 2, 4], "transformer_depth": [1, 2, 10], "transformer_depth_middle": 10, "context_dim": 2048,
    "adm_in_channels": 2816, "num_classes": "sequential",
}


@pytest.mark.parametrize("build,cls,config,expected,params", [
    (M.tiny_sd1, "UNetModel", _FULL_SD1, 192, 859.5), (M.tiny_sd2, "UNetModel", _FULL_SD2, 192, 865.9),
    (M.tiny_sdxl, "SDXLUNetModel", _FULL_SDXL, 722, 2567.5),
])
def test_full_size_unets_give_kohyas_module_counts(build, cls, config, expected, params):
    bundle = LdmBundle(build())
    with torch.device("meta"):
        bundle.unet = getattr(M, cls)(**config)
    assert round(sum(p.numel() for p in bundle.unet.parameters()) / 1e6, 1) == params  # the real architecture
    targets = bundle.lora_targets(text_encoder=False)
    assert len(targets) == expected == M.unet_target_count(config)
    assert targets[0].kohya_key == ("lora_unet_input_blocks_4_1_proj_in" if bundle.family == "sdxl"
                                    else "lora_unet_down_blocks_0_attentions_0_proj_in")


def test_sd1_lora_is_the_same_in_memory_in_diffusers_and_in_the_webui(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    model = M.tiny_sd1()
    bundle = LdmBundle(model)
    host_clip = bundle.text_encoders[0]
    snapshot = HostSnapshot.take(model)
    _, _, timesteps, noisy, _ = _batch(bundle, seed=1)
    tokens = bundle.tokenize(CAPTIONS)
    with torch.no_grad():
        base_context = bundle.encode_text(tokens).context

    network = _train(bundle, text_encoder=True)
    with torch.no_grad():
        memory_context = bundle.encode_text(tokens).context
        memory_out = bundle.predict(noisy, timesteps, Conditioning(base_context))
    tensors = _kohya_file(network, tmp_path)
    lora.remove(network)
    for module in (bundle.unet, *bundle.text_encoders):  # what the trainer's ModuleFlags.restore does
        module.requires_grad_(True)
    host_clip.requires_grad_(False)
    assert not (memory_context - base_context).abs().max() < 1e-4, "the text-encoder LoRA did not train"
    assert snapshot.diff() == []

    expected = M.unet_target_count(M.SD1_UNET) + 6 * M.CLIP_CONFIG["num_hidden_layers"]
    assert len(_modules(tensors)) == expected and len(tensors) == 3 * expected

    # the WebUI's name rules on a copy of the host, merged by hand
    merged_host = copy.deepcopy(model)
    assert webui_merge(merged_host, "sd1", tensors) == expected
    merged = LdmBundle(merged_host)
    with torch.no_grad():
        _close(merged.predict(noisy, timesteps, Conditioning(base_context)), memory_out)
        _close(merged.encode_text(tokens).context, memory_context)

    require_kohya_loader()
    # diffusers: pipeline-level loader over a UNet and text encoder converted from the same weights
    unet, text_encoder = diffusers_unet(bundle.unet, M.SD1_UNET), diffusers_text_encoder(host_clip)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(32,), norm_num_groups=32), text_encoder=text_encoder,
        tokenizer=model.cond_stage_model.wrapped.tokenizer, unet=unet, scheduler=DDPMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(dict(tensors))
    assert _lora_layers(pipe.unet) == M.unet_target_count(M.SD1_UNET)
    patched = sum(type(m).__name__ == "PatchedLoraProjection" for m in pipe.text_encoder.modules())
    assert patched == 6 * M.CLIP_CONFIG["num_hidden_layers"]
    with torch.no_grad():
        _close(pipe.unet(noisy, timesteps, encoder_hidden_states=base_context).sample, memory_out)
        _close(pipe.text_encoder(tokens.ids[0]).last_hidden_state, memory_context)


@pytest.mark.parametrize("build,unet_params", [(M.tiny_sdxl, M.SDXL_UNET), (M.tiny_sd2, M.SD2_UNET)])
def test_unet_lora_is_the_same_in_memory_in_diffusers_and_in_the_webui(tmp_path, build, unet_params):
    from diffusers.loaders import LoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    model = build()
    bundle = LdmBundle(model)
    sdxl = bundle.family == "sdxl"
    snapshot = HostSnapshot.take(model)
    _, _, timesteps, noisy, size_ids = _batch(bundle, seed=1)
    with torch.no_grad():
        cond = bundle.encode_text(bundle.tokenize(CAPTIONS))
    cond.size_ids = size_ids if sdxl else None

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    network = _train(bundle, text_encoder=False, checkpointing=True)
    with torch.no_grad():
        memory_out = bundle.predict(noisy, timesteps, cond)
    tensors = _kohya_file(network, tmp_path)
    lora.remove(network)
    for name, param in model.named_parameters():
        param.requires_grad_(flags[name])
    assert snapshot.diff() == []
    assert len(_modules(tensors)) == M.unet_target_count(unet_params)

    merged_host = copy.deepcopy(model)
    assert webui_merge(merged_host, bundle.family, tensors) == M.unet_target_count(unet_params)
    with torch.no_grad():
        _close(LdmBundle(merged_host).predict(noisy, timesteps, cond), memory_out)

    require_kohya_loader()
    unet = diffusers_unet(bundle.unet, unet_params, sdxl=sdxl)
    loader = StableDiffusionXLLoraLoaderMixin if sdxl else LoraLoaderMixin
    # as StableDiffusionXLPipeline.load_lora_weights does: unet_config maps the sgm block names
    state, alphas = loader.lora_state_dict(dict(tensors), unet_config=unet.config)
    loader.load_lora_into_unet(state, alphas, unet)
    assert _lora_layers(unet) == M.unet_target_count(unet_params)
    extra = {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": size_ids}} if sdxl else {}
    with torch.no_grad():
        _close(unet(noisy, timesteps, encoder_hidden_states=cond.context, **extra).sample, memory_out)


# ------------------------------------------------------------------------------ host integrity (trainer)
class _StopAfter2(TrainCallbacks):
    step = 0

    def on_step(self, info):
        self.step = info.step

    def should_stop(self):
        return self.step >= 2


class _Crash(TrainCallbacks):
    def on_step(self, info):
        if info.step == 2:
            raise RuntimeError("crash mid-run")


def _as_the_webui_leaves_it(model: nn.Module) -> None:
    """After a WebUI load every UNet weight requires grad; make the flags mixed so restoring them is tested."""
    model.model.diffusion_model.requires_grad_(True)
    model.model.diffusion_model.input_blocks[1].train()


@pytest.mark.parametrize("build,how,options", [
    (M.tiny_sd1, "finished", {"train_text_encoder": True, "gradient_checkpointing": True}),
    (M.tiny_sd1, "stopped", {}),
    (M.tiny_sdxl, "crashed", {"gradient_checkpointing": True, "min_snr_gamma": 5.0}),
    (M.tiny_sd2, "finished", {"train_text_encoder": True}),
    (M.tiny_sdxl, "finished", {"train_text_encoder": True}),
])
def test_host_is_bit_identical_after_a_trainer_run(build, how, options, dataset_dir, tmp_path):
    model = build()
    _as_the_webui_leaves_it(model)
    bundle = LdmBundle(model)
    snapshot = HostSnapshot.take(model)
    generation_before = sample_images(bundle, ["a red circle"], 64, 64, steps=2, seed=7)[0]
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=3, **options)
    if how == "crashed":
        with pytest.raises(RuntimeError, match="crash mid-run"):
            train(cfg, bundle, _Crash())
    else:
        result = train(cfg, bundle, _StopAfter2() if how == "stopped" else None)
        assert result.steps == (2 if how == "stopped" else 3) and result.output.is_file()
        tensors, metadata = read_lora(result.output)
        te = _te_count(bundle.family) if options.get("train_text_encoder") else 0
        unet = {"sd1": M.SD1_UNET, "sd2": M.SD2_UNET, "sdxl": M.SDXL_UNET}[bundle.family]
        assert len(_modules(tensors)) == M.unet_target_count(unet) + te
    assert snapshot.diff() == []
    generation_after = sample_images(bundle, ["a red circle"], 64, 64, steps=2, seed=7)[0]
    assert generation_after.tobytes() == generation_before.tobytes()  # the next image is the same as before


# ----------------------------------------------------------------------------------------- v-prediction
def test_loss_target_is_velocity_exactly_when_the_host_says_v(dataset_dir, tmp_path, monkeypatch):
    for model in (M.tiny_sd2(v=True), M.tiny_sd2(v=False), M.tiny_sd1()):
        bundle = LdmBundle(model)
        assert bundle.parameterization == model.parameterization
        latents, noise, timesteps, _, _ = _batch(bundle)
        target = loss.loss_target(bundle.parameterization, latents, noise, timesteps, bundle.alphas_cumprod)
        if model.parameterization == "v":  # ldm's own definition of the velocity
            assert torch.allclose(target, model.get_v(latents, noise, timesteps), atol=1e-6)
            assert not torch.allclose(target, noise, atol=1e-2)
        else:
            assert torch.equal(target, noise)

    seen = []
    original = loss.loss_target

    def spy(parameterization, *args):
        seen.append(parameterization)
        return original(parameterization, *args)

    monkeypatch.setattr(loss, "loss_target", spy)
    train(make_config(dataset_dir, tmp_path, max_train_steps=1), LdmBundle(M.tiny_sd2(v=True)))
    assert seen == ["v"]


# ----------------------------------------------------------------------------- checkpointing, WebUI Lora
def test_ldm_checkpoint_flags_are_bypassed_for_one_call_and_left_as_they_were():
    model = M.tiny_sd1()  # use_checkpoint: True, as in the SD1 yaml
    bundle = LdmBundle(model)
    assert bundle.unet.input_blocks[1][1].transformer_blocks[0].checkpoint is True
    _, _, timesteps, noisy, _ = _batch(bundle)
    with torch.no_grad():
        cond = bundle.encode_text(bundle.tokenize(CAPTIONS))
    bundle.unet.requires_grad_(False)
    network = lora.inject(bundle.lora_targets(False), RANK, ALPHA, 0.0)
    lora.trainable(network.parameters(), True)
    for layer in network.layers.values():
        nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    try:
        # ldm's own checkpoint function differentiates every block parameter: it fails over frozen weights
        with pytest.raises(RuntimeError, match="does not require grad"):
            bundle.unet(noisy, timesteps, context=cond.context).square().mean().backward()
        for param in network.parameters():
            param.grad = None
        snapshot = HostSnapshot.take(model)
        grads = {}
        for enabled in (False, True):
            bundle.set_gradient_checkpointing(enabled)
            bundle.predict(noisy, timesteps, cond).square().mean().backward()
            grads[enabled] = [p.grad.clone() for p in network.parameters()]
            for param in network.parameters():
                param.grad = None
            assert snapshot.diff() == []
        for plain, checkpointed in zip(grads[False], grads[True], strict=True):
            assert torch.allclose(plain, checkpointed, atol=1e-6)
    finally:
        lora.remove(network)


def test_reset_builtin_lora_undoes_the_extensions_in_place_merge():
    model = M.tiny_sd2()  # its OpenCLIP text encoder has the MultiheadAttention case
    snapshot = HostSnapshot.take(model, full=True)  # values, not version counters: restoring writes in place
    transformer = model.model.diffusion_model.input_blocks[1][1]
    to_q, proj_in = transformer.transformer_blocks[0].attn1.to_q, transformer.proj_in
    mha = model.cond_stage_model.wrapped.model.transformer.resblocks[0].attn
    names = (("someone_elses_lora", 1.0, 1.0, 1.0),)
    with torch.no_grad():  # what networks.network_apply_weights leaves behind
        to_q.network_weights_backup, to_q.network_bias_backup = to_q.weight.to("cpu", copy=True), None
        to_q.weight += 0.1
        to_q.bias = nn.Parameter(torch.ones(to_q.out_features))  # a network with a bias diff adds one
        proj_in.network_weights_backup = proj_in.weight.to("cpu", copy=True)
        proj_in.network_bias_backup = proj_in.bias.to("cpu", copy=True)
        proj_in.weight *= 2
        proj_in.bias += 1
        mha.network_weights_backup = (mha.in_proj_weight.to("cpu", copy=True), mha.out_proj.weight.to("cpu", copy=True))
        mha.network_bias_backup = mha.out_proj.bias.to("cpu", copy=True)
        mha.in_proj_weight += 1
        mha.out_proj.weight += 1
        mha.out_proj.bias += 1
        for module in (to_q, proj_in, mha):
            module.network_current_names = names
    assert len(snapshot.diff()) >= 6
    loaded_networks = ["someone_elses_lora"]
    assert reset_builtin_lora(model, loaded_networks) == 3
    assert loaded_networks == [] and all(m.network_current_names == () for m in (to_q, proj_in, mha))
    assert snapshot.diff() == []
    # idempotent, and nothing to report: the backups stay (as after a plain generation) but nothing is merged
    assert reset_builtin_lora(model) == 0 and snapshot.diff() == []


def test_snapshot_sees_every_kind_of_change():
    model = M.tiny_sd1()
    snapshot = HostSnapshot.take(model)
    unet = model.model.diffusion_model
    with torch.no_grad():
        model.alphas_cumprod.view(torch.int32)[5] ^= 1  # one bit of a buffer
    unet.out[2].weight.requires_grad_(not unet.out[2].weight.requires_grad)
    unet.middle_block.train(not unet.middle_block.training)
    unet.out[0].forward = lambda x: x
    unet.out[1] = nn.Identity()  # e.g. a LoRA wrapper left behind
    problems = "\n".join(snapshot.diff())
    for expected in ("tensor alphas_cumprod", "requires_grad model.diffusion_model.out.2.weight",
                     "training model.diffusion_model.middle_block", "forward override on 'model.diffusion_model.out.0'",
                     "module model.diffusion_model.out.1: SiLU -> Identity"):
        assert expected in problems
    with pytest.raises(RuntimeError, match="host model changed"):
        snapshot.verify()


def test_unsupported_webui_models_fail_clearly():
    inpaint = M.tiny_sd1()
    inpaint.model.diffusion_model.in_channels = 9
    with pytest.raises(ValueError, match="inpainting"):
        LdmBundle(inpaint)
    refiner = M.tiny_sdxl()
    refiner.conditioner.embedders[2].input_key = "aesthetic_score"
    with pytest.raises(ValueError, match="refiner"):
        LdmBundle(refiner)
    sd3 = M.tiny_sd1()
    sd3.is_sd3 = True
    with pytest.raises(ValueError, match="SD3"):
        LdmBundle(sd3)


@pytest.mark.parametrize("full", [False, True])
def test_quick_and_full_snapshots_see_writes_that_keep_shape_and_storage(full):
    model = M.tiny_sd1()
    weight = model.model.diffusion_model.input_blocks[1][1].proj_in.weight
    snapshot = HostSnapshot.take(model, full=full)
    with torch.no_grad():
        weight.data.view(-1)[0] += 1  # through .data: its own version counter, but a sampled value
    assert any("proj_in.weight" in line for line in snapshot.diff())
    with torch.no_grad():
        weight.data.view(-1)[0] -= 1
    assert HostSnapshot.take(model, full=full).diff() == []
    snapshot = HostSnapshot.take(model, full=full)
    with torch.no_grad():
        weight.view(-1)[1] += 1  # in place through the parameter: the version counter moves
    assert any("proj_in.weight" in line for line in snapshot.diff())
