"""The exported file: kohya's names and counts, metadata, and the same outputs in diffusers as in training."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import make_config
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers_compat import require_kohya_loader

from lora_train.engine.output.export import read_lora
from lora_train.engine.train.progress import TrainCallbacks
from lora_train.engine.train.trainer import train
from lora_train.hosts.diffusers import DiffusersBundle

KEY = re.compile(r"^lora_(unet|te|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def probe(bundle: DiffusersBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder and UNet outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(123)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    with torch.no_grad():
        cond = bundle.encode_text(bundle.tokenize(["a red circle", "shapez, blue square"]))
        if cond.pooled is not None:
            cond.size_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
        return cond.context, bundle.predict(latents, torch.tensor([50, 700]), cond)


class ProbeAtEnd(TrainCallbacks):
    """Records the in-memory model's outputs after the last step, while the LoRA is still injected."""

    def __init__(self, bundle):
        self.bundle = bundle

    def on_step(self, info):
        if info.step == info.total_steps:
            self.outputs = probe(self.bundle)


def expected_modules(bundle: DiffusersBundle, text_encoder: bool) -> int:
    """kohya's count: 12 Linear/1x1 per transformer (2 proj + 10 per block), 6 Linear per CLIP layer."""
    transformers = [m for n, m in bundle.unet.named_modules() if n.endswith(tuple(f"attentions.{i}" for i in range(3)))]
    blocks = sum(len(t.transformer_blocks) for t in transformers)
    count = 2 * len(transformers) + 10 * blocks
    if text_encoder:
        count += sum(6 * e.config.num_hidden_layers for e in bundle.text_encoders)
    return count


def train_and_probe(bundle, dataset_dir, tmp_path):
    pristine = copy.deepcopy(bundle)
    recorder = ProbeAtEnd(bundle)
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=4, lora_rank=4, lora_alpha=2, train_text_encoder=True,
                      learning_rate=5e-3, text_encoder_lr=5e-3, trigger_word="shapez")
    result = train(cfg, bundle, recorder)
    base_outputs = probe(pristine)
    assert not torch.allclose(recorder.outputs[1], base_outputs[1], atol=1e-4), "LoRA changed nothing"
    return result, recorder.outputs, pristine


def test_sd1_file_names_counts_metadata_and_diffusers_equivalence(tiny, dataset_dir, tmp_path):
    result, (context, unet_out), pristine = train_and_probe(tiny, dataset_dir, tmp_path)
    tensors, meta = read_lora(result.output)
    assert all(KEY.match(k) for k in tensors), [k for k in tensors if not KEY.match(k)][:5]
    modules = {k.split(".")[0] for k in tensors}
    assert len(modules) == expected_modules(tiny, True) == 72 + 12
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert float(tensors["lora_te_text_model_encoder_layers_1_mlp_fc2.alpha"]) == 2.0
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                "ss_tag_frequency", "ss_num_train_images", "ss_steps", "ss_epoch", "ss_learning_rate",
                "ss_output_name", "ss_seed", "ss_training_started_at", "ss_training_finished_at",
                "modelspec.architecture", "modelspec.title", "modelspec.date", "modelspec.resolution",
                "modelspec.trigger_phrase", "sshs_model_hash", "sshs_legacy_hash"):
        assert key in meta, key
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.trigger_phrase"] == "shapez"
    assert '"shapez"' in meta["ss_tag_frequency"]

    require_kohya_loader()
    pipe = StableDiffusionPipeline(
        vae=pristine.vae, text_encoder=pristine.text_encoders[0], tokenizer=pristine.tokenizers[0],
        unet=pristine.unet, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(result.output.parent), weight_name=result.output.name)
    loaded = DiffusersBundle(pristine.arch, pipe.unet, pipe.vae, [pipe.text_encoder], pristine.tokenizers)
    loaded_context, loaded_unet = probe(loaded)
    torch.testing.assert_close(loaded_context, context, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loaded_unet, unet_out, atol=2e-5, rtol=1e-4)


def test_sdxl_file_uses_input_blocks_names_and_loads_in_diffusers(tiny_sdxl, dataset_dir, tmp_path):
    result, (context, unet_out), pristine = train_and_probe(tiny_sdxl, dataset_dir, tmp_path)
    tensors, meta = read_lora(result.output)
    modules = {k.split(".")[0] for k in tensors}
    assert len(modules) == expected_modules(tiny_sdxl, True)
    assert all(KEY.match(k) for k in tensors)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in modules
    assert "lora_unet_output_blocks_2_1_proj_out" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2" in modules
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1" in modules
    assert not any("down_blocks" in m or "up_blocks" in m for m in modules)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    require_kohya_loader()
    pipe = StableDiffusionXLPipeline(
        vae=pristine.vae, text_encoder=pristine.text_encoders[0], text_encoder_2=pristine.text_encoders[1],
        tokenizer=pristine.tokenizers[0], tokenizer_2=pristine.tokenizers[1], unet=pristine.unet,
        scheduler=DDIMScheduler(),
    )
    pipe.load_lora_weights(str(result.output.parent), weight_name=result.output.name)
    loaded = DiffusersBundle(pristine.arch, pipe.unet, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2],
                             pristine.tokenizers)
    loaded_context, loaded_unet = probe(loaded)
    torch.testing.assert_close(loaded_context, context, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loaded_unet, unet_out, atol=2e-5, rtol=1e-4)


def test_merge_by_hand_matches_alpha_over_rank(tiny, dataset_dir, tmp_path):
    """W + alpha/rank * up @ down, the formula every consumer applies, reproduces one trained layer."""
    pristine = copy.deepcopy(tiny)
    result, _, _ = train_and_probe(tiny, dataset_dir, tmp_path)
    tensors, _ = read_lora(result.output)
    key = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
    down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
    scale = float(tensors[f"{key}.alpha"]) / down.shape[0]
    assert scale == pytest.approx(0.5)
    module = pristine.unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")
    x = torch.randn(3, module.in_features)
    from lora_train.engine.model import LoraTarget
    from lora_train.engine.network import lora

    network = lora.inject([LoraTarget(pristine.unet, "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
                                      key)], 4, 2, 0.0)
    lora.load_kohya(network, {k: v for k, v in tensors.items() if k.startswith(key + ".")}, "test")
    wrapped = pristine.unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")
    with torch.no_grad():
        merged = torch.nn.functional.linear(x, module.weight + scale * up @ down)
        torch.testing.assert_close(wrapped(x), merged, atol=1e-5, rtol=1e-4)
    lora.remove(network)


def test_written_files_get_the_mode_the_umask_gives(tmp_path):
    """kohya's files are 0644 under the usual umask; mkstemp's 0600 hid ours from a WebUI run as another user."""
    import os
    import stat

    from lora_train.engine import files

    umask = os.umask(0o022)
    os.umask(umask)
    path = files.atomic_write_text(tmp_path / "card.json", "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_diffusers_loads_a_locon_file_to_the_same_outputs(tiny, tmp_path):
    """diffusers reads kohya's LoRA and LoCon (its converter has no LoHa, LoKr or dora_scale). Here, not in
    test_network_types (which needs the WebUI's ldm), so the venvs whose diffusers loads kohya files run it."""
    from safetensors.torch import save_file
    from trained_networks import SPECS, trained_network

    from lora_train.engine.network import lora

    pristine = copy.deepcopy(tiny)
    network = trained_network(tiny, SPECS["LoCon"])
    want = probe(tiny)
    save_file(lora.kohya_state_dict(network, torch.float32), str(tmp_path / "locon.safetensors"))
    lora.remove(network)
    require_kohya_loader()
    pipe = StableDiffusionPipeline(
        vae=pristine.vae, text_encoder=pristine.text_encoders[0], tokenizer=pristine.tokenizers[0],
        unet=pristine.unet, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(tmp_path), weight_name="locon.safetensors")
    loaded = DiffusersBundle(pristine.arch, pipe.unet, pipe.vae, [pipe.text_encoder], pristine.tokenizers)
    for got, expected in zip(probe(loaded), want, strict=True):
        torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)
