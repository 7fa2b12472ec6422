"""Single-file checkpoints (the files users have) load offline into the diffusers host with equal outputs.

The checkpoints are written from real ldm models (tests/ldm_models.py) at tiny sizes, so the key layout is the
one A1111 and kohya read; the diffusers configs come from diffusers' own converters of the ldm yaml.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (requirements/ldm-test.txt)")
pytest.importorskip("pytorch_lightning", reason="needs pytorch_lightning<2 (requirements/ldm-test.txt)")

import ldm_models as M  # noqa: E402
import torch  # noqa: E402
from diffusers_compat import create_unet_diffusers_config, create_vae_diffusers_config  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lora_train.engine.output import weight_kinds  # noqa: E402
from lora_train.engine.output.weights import WeightsFileError  # noqa: E402
from lora_train.hosts import checkpoint_convert  # noqa: E402
from lora_train.hosts.architectures import Architecture  # noqa: E402
from lora_train.hosts.diffusers import load_bundle, load_single_file  # noqa: E402

CAPTIONS = ["a photo of a red cat", "a house by the sea"]


def architecture(family, unet_cfg, text_encoders, pads, **unet_overrides) -> Architecture:
    original = M.original_config(unet_cfg)
    unet = {**create_unet_diffusers_config(original, image_size=8), **unet_overrides}
    vae = create_vae_diffusers_config(original, image_size=64, scaling_factor=0.18215)
    return Architecture(family, unet, vae, text_encoders, pads, resolution=64)


def save(model, path) -> None:
    state = model.state_dict()
    if any(k.startswith("conditioner.") for k in state):  # A1111's SDXL alias cond_stage_model = conditioner
        state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def unwrap_open_clip(model):
    """The WebUI's sd_hijack wrapping is not in checkpoint files: undo it before saving."""
    embedder = model.cond_stage_model.wrapped
    embedder.model.token_embedding = embedder.model.token_embedding.wrapped
    model.cond_stage_model = embedder
    return model


def compare_unet(ldm_unet, bundle, context, y=None, size_ids=None, pooled=None):
    from lora_train.engine.model import Conditioning

    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=generator)
    t = torch.tensor([10, 600])
    with torch.no_grad():
        expected = ldm_unet(x, t, context=context, y=y)
        got = bundle.predict(x, t, Conditioning(context, pooled, size_ids))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_sd1_checkpoint(tmp_path):
    model = M.tiny_sd1(webui=False).eval()
    path = tmp_path / "tiny-sd1.safetensors"
    save(model, path)
    arch = architecture("sd1", M.SD1_UNET, [M.CLIP_CONFIG], ["<|endoftext|>"])
    bundle = load_single_file(path, arch=arch)
    assert bundle.family == "sd1" and bundle.parameterization == "eps"
    with torch.no_grad():
        context = model.cond_stage_model(CAPTIONS)
        ours = bundle.encode_text(bundle.tokenize(CAPTIONS)).context
        torch.testing.assert_close(ours, context, atol=1e-5, rtol=1e-4)
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        expected_latents = model.first_stage_model.encode(pixels).mode() * model.scale_factor
        torch.testing.assert_close(bundle.encode_images(pixels), expected_latents, atol=1e-5, rtol=1e-4)
    compare_unet(model.model.diffusion_model, bundle, context)


def test_sd2_v_checkpoint_with_yaml_beside_it(tmp_path):
    model = unwrap_open_clip(M.tiny_sd2(v=True)).eval()
    path = tmp_path / "tiny-sd2.safetensors"
    save(model, path)
    (tmp_path / "tiny-sd2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    text_encoder = {**M.CLIP_CONFIG, "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_act": "gelu",
                    "intermediate_size": 128}
    arch = architecture("sd2", M.SD2_UNET, [text_encoder], ["!"])
    bundle = load_single_file(path, arch=arch)
    assert bundle.family == "sd2" and bundle.parameterization == "v"
    with torch.no_grad():
        context = model.cond_stage_model(CAPTIONS)
        torch.testing.assert_close(bundle.encode_text(bundle.tokenize(CAPTIONS)).context, context, atol=1e-5,
                                   rtol=1e-4)
    compare_unet(model.model.diffusion_model, bundle, context)
    assert load_single_file(path, v_parameterization=False, arch=arch).parameterization == "eps"


def test_family_detection_and_clear_errors(tmp_path):
    shapes = {k: tuple(v.shape) for k, v in M.tiny_sd1(webui=False).state_dict().items()}
    assert weight_kinds.checkpoint_family(shapes) == "sd1"
    assert weight_kinds.checkpoint_family({"conditioner.embedders.1.model.x": (1,)}) == "sdxl"
    assert weight_kinds.checkpoint_family({"foo": (1,)}) is None
    arch = architecture("sd1", M.SD1_UNET, [M.CLIP_CONFIG], ["<|endoftext|>"])
    state = M.tiny_sd1(webui=False).state_dict()
    for name, drop in (("no-output-block", "output_blocks.3"), ("no-vae", "first_stage_model.decoder"),
                       ("no-text", "cond_stage_model.transformer.text_model.encoder")):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items() if drop not in k}, str(path))
        with pytest.raises(WeightsFileError, match=f"{name}.safetensors") as err:
            load_single_file(path, arch=arch)
        assert "\n" not in str(err.value)
    other = tmp_path / "other.safetensors"  # an SD1 layout of other sizes than the architecture's
    save_file({k: v.contiguous() for k, v in M.tiny_sd1(webui=False).state_dict().items()}, str(other))
    wider = architecture("sd1", {**M.SD1_UNET, "model_channels": 64}, [M.CLIP_CONFIG], ["<|endoftext|>"])
    with pytest.raises(WeightsFileError, match=r"other\.safetensors: \d+ UNet tensor\(s\) have other shapes"):
        load_single_file(other, arch=wider)
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_bundle(str(tmp_path / "missing.safetensors"))


def test_sdxl_checkpoint(tmp_path):
    engine = M.tiny_sdxl().eval()
    embedders = engine.conditioner.embedders
    clip_l, big_g = embedders[0].wrapped, embedders[1].wrapped
    clip_l.transformer.text_model.embeddings.token_embedding = (
        clip_l.transformer.text_model.embeddings.token_embedding.wrapped
    )
    big_g.model.token_embedding = big_g.model.token_embedding.wrapped
    embedders[0], embedders[1] = clip_l, big_g
    path = tmp_path / "tiny-sdxl.safetensors"
    save(engine, path)
    big_g_config = {**M.CLIP_CONFIG, "num_attention_heads": 2, "hidden_act": "gelu", "intermediate_size": 128}
    unet_cfg = {**M.SDXL_UNET, "transformer_depth_middle": 2}
    # 0.26's config helper only recognises SDXL's vector conditioning at full size; say it explicitly
    sdxl_vector = {"addition_time_embed_dim": M.SIZE_DIM, "addition_embed_type": "text_time", "class_embed_type": None}
    arch = architecture("sdxl", unet_cfg, [M.CLIP_CONFIG, big_g_config], ["<|endoftext|>", "!"], **sdxl_vector)
    bundle = load_single_file(path, arch=arch)
    assert bundle.family == "sdxl"
    tokens_l = clip_l.tokenizer(CAPTIONS, truncation=True, max_length=77, padding="max_length",
                                return_tensors="pt").input_ids
    import open_clip

    tokens_g = open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        hidden_l = clip_l.transformer(tokens_l, output_hidden_states=True).hidden_states[-2]
        out_g = big_g.encode_with_transformer(tokens_g)
        context = torch.cat([hidden_l, out_g["penultimate"]], dim=-1)
        ours = bundle.encode_text(bundle.tokenize(CAPTIONS))
        torch.testing.assert_close(ours.context, context, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.pooled, out_g["pooled"], atol=1e-5, rtol=1e-4)
        sizes = torch.tensor([[64.0, 64], [64, 64]])
        y = torch.cat([out_g["pooled"], embedders[2](sizes), embedders[3](torch.zeros(2, 2)), embedders[4](sizes)], 1)
    size_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    compare_unet(engine.model.diffusion_model, bundle, context, y=y, size_ids=size_ids, pooled=out_g["pooled"])
    # NoobAI-style v-pred SDXL files carry empty "v_pred" and "ztsnr" tensors: v-prediction, zero terminal SNR
    marked = tmp_path / "tiny-sdxl-vpred.safetensors"
    save_file({**load_file(str(path)), "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(marked))
    vpred = load_single_file(marked, arch=arch)
    assert (bundle.parameterization, bundle.zero_terminal_snr) == ("eps", False)
    assert (vpred.parameterization, vpred.zero_terminal_snr) == ("v", True)
    assert load_single_file(marked, v_parameterization=False, arch=arch).parameterization == "eps"


def test_ckpt_files_load_weights_only_and_refuse_pickled_objects(tmp_path):
    model = M.tiny_sd1(webui=False).eval()
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 10}, path)
    arch = architecture("sd1", M.SD1_UNET, [M.CLIP_CONFIG], ["<|endoftext|>"])
    with torch.no_grad():
        context = model.cond_stage_model(CAPTIONS)
    compare_unet(model.model.diffusion_model, load_single_file(path, arch=arch), context)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "callback": ValueError("not a tensor")}, unsafe)
    with pytest.raises(WeightsFileError, match="unsafe.ckpt: this file stores Python objects"):
        checkpoint_convert.read_state_dict(unsafe)


def test_a_checkpoint_is_read_tensor_by_tensor_into_the_asked_dtype(tmp_path, monkeypatch):
    """A fp16 file loaded for fp32 training: every weight is converted as it is read and owns its memory (none
    is a view into the file's mapping, which would keep the whole file resident beside the model), and the
    file's mapping is dropped every window of bytes read, never held for the whole load."""
    from lora_train.engine.output import weights

    model = M.tiny_sd1(webui=False).eval().half()
    path = tmp_path / "tiny-fp16.safetensors"
    save(model, path)
    file_bytes = path.stat().st_size
    opened: list[int] = []
    real_open = weights.safe_open
    monkeypatch.setattr(weights, "safe_open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    monkeypatch.setattr(weights, "STREAM_WINDOW", file_bytes // 8)
    arch = architecture("sd1", M.SD1_UNET, [M.CLIP_CONFIG], ["<|endoftext|>"])
    bundle = load_single_file(path, arch=arch, dtype=torch.float32)
    assert len(opened) >= 4  # reopened after each eighth of the file read (not all of it is weights it needs)
    modules = (bundle.unet, bundle.vae, *bundle.text_encoders)
    params = [p for m in modules for p in m.parameters()]
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.untyped_storage().nbytes() == p.numel() * 4 for p in params)  # own memory, exactly its size
    model = model.float()
    with torch.no_grad():
        context = model.cond_stage_model(CAPTIONS)
    compare_unet(model.model.diffusion_model, bundle, context)
