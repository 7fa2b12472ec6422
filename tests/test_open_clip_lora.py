"""Text-encoder LoRA on OpenCLIP (SD2, SDXL's bigG in the WebUI): kohya's q/k/v/out + mlp modules.

Oracle: the WebUI's own way to apply such a file (extensions-builtin/Lora/networks.py): the q, k and v updates
stacked onto ``in_proj_weight``, out/mlp updates onto their Linears, on an untouched copy of the model, through
torch's own MultiheadAttention. Never the split module under test.
"""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (requirements/ldm-test.txt)")
pytest.importorskip("pytorch_lightning", reason="needs pytorch_lightning<2 (requirements/ldm-test.txt)")

import ldm_models as M  # noqa: E402
import torch  # noqa: E402
from webui_networks import updown  # noqa: E402

from lora_train.engine.network import lora  # noqa: E402
from lora_train.engine.network.module_flags import ModuleFlags  # noqa: E402
from lora_train.hosts.ldm import LdmBundle  # noqa: E402
from lora_train.webui.host_snapshot import HostSnapshot  # noqa: E402

CAPTIONS = ["a red cat", "two blue squares on a table"]


def _apply_as_the_webui_does(model, tensors: dict[str, torch.Tensor], prefix: str, open_clip) -> None:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        key, rest = name.split(".", 1)
        if key.startswith(prefix):
            modules.setdefault(key, {})[rest] = tensor.float()
    with torch.no_grad():
        for key, w in modules.items():
            layer, role = key[len(prefix):].split("_", 1)
            block = open_clip.transformer.resblocks[int(layer)]
            if role in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"):
                rows = block.attn.in_proj_weight.chunk(3)["qkv".index(role[10])]
                rows += updown(w, rows)
            else:
                target = {"self_attn_out_proj": block.attn.out_proj, "mlp_fc1": block.mlp.c_fc,
                          "mlp_fc2": block.mlp.c_proj}[role]
                target.weight += updown(w, target.weight)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_trained_open_clip_lora_conditions_as_the_webui_applies_the_file(family):
    model = M.tiny_sd2() if family == "sd2" else M.tiny_sdxl()
    pristine = copy.deepcopy(model)
    snapshot = HostSnapshot.take(model, full=True)
    bundle = LdmBundle(model)
    with torch.no_grad():
        before = bundle.encode_text(bundle.tokenize(CAPTIONS))
    flags = ModuleFlags.capture([bundle.unet, *bundle.text_encoders])  # peft freezes; the trainer puts it back
    network = lora.inject(bundle.lora_targets(text_encoder=True), rank=4, alpha=2.0, dropout=0.0)
    try:
        with torch.no_grad():
            # a split module with a zero LoRA computes what the fused attention computed
            torch.testing.assert_close(bundle.encode_text(bundle.tokenize(CAPTIONS)).context, before.context)
            for param in network.parameters("lora_te"):
                param.normal_(0, 0.3)
            trained = bundle.encode_text(bundle.tokenize(CAPTIONS))
        tensors = lora.kohya_state_dict(network, torch.float32)
    finally:
        lora.remove(network)
        flags.restore()
    assert snapshot.diff() == []  # views, children and forward overrides all gone
    prefix = "lora_te2_text_model_encoder_layers_" if family == "sdxl" else "lora_te_text_model_encoder_layers_"
    embedder = pristine.conditioner.embedders[1] if family == "sdxl" else pristine.cond_stage_model
    _apply_as_the_webui_does(pristine, tensors, prefix, embedder.wrapped.model)
    if family == "sdxl":  # CLIP-L's modules: HF Linears, the usual kohya way
        clip_l = pristine.conditioner.embedders[0].wrapped.transformer
        linears = {f"lora_te1_{n.replace('.', '_')}": m for n, m in clip_l.named_modules()}
        with torch.no_grad():
            for name in {k.split(".")[0] for k in tensors if k.startswith("lora_te1_")}:
                w = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
                linears[name].weight += updown(w, linears[name].weight)
    expected_bundle = LdmBundle(pristine)
    with torch.no_grad():
        expected = expected_bundle.encode_text(expected_bundle.tokenize(CAPTIONS))
    assert not torch.allclose(expected.context, before.context, atol=1e-3)
    torch.testing.assert_close(trained.context, expected.context, atol=1e-5, rtol=1e-4)
    if family == "sdxl":
        torch.testing.assert_close(trained.pooled, expected.pooled, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family,width,layers,heads,expected", [
    ("sd2", 1024, 24, 16, 138), ("sdxl", 1280, 32, 20, 72 + 192),
])
def test_full_size_text_encoders_give_kohyas_module_counts(family, width, layers, heads, expected):
    model = M.tiny_sd2() if family == "sd2" else M.tiny_sdxl()
    embedder = (model.conditioner.embedders[1] if family == "sdxl" else model.cond_stage_model).wrapped
    with torch.device("meta"):
        embedder.model = M.tiny_open_clip(width=width, layers=layers, heads=heads, embed_dim=width)
    if family == "sdxl":
        with torch.device("meta"):
            clip_l = model.conditioner.embedders[0].wrapped
            clip_l.transformer = type(clip_l.transformer)(type(clip_l.transformer.config)(
                **{**M.CLIP_CONFIG, "num_hidden_layers": 12}))
    targets = LdmBundle(model).lora_targets(text_encoder=True)
    assert len([t for t in targets if t.kohya_key.startswith("lora_te")]) == expected
