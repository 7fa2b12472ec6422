"""LoCon, LoHa, LoKr and DoRA: each exported file, applied as the WebUI applies it, gives the in-memory model's
outputs; the config as kohya/LyCORIS users write it; LoRA+ learning rates."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (requirements/ldm-test.txt)")

import ldm_models as M  # noqa: E402
import webui_networks  # noqa: E402
from conftest import make_config  # noqa: E402
from test_export import probe  # noqa: E402
from test_ldm_host import _FULL_SD1, _FULL_SDXL  # noqa: E402
from test_resume import assert_same_weights  # noqa: E402
from trained_networks import SPECS, trained_network  # noqa: E402

from lora_train.engine.config.network_spec import NetworkSpec  # noqa: E402
from lora_train.engine.config.settings import ConfigError  # noqa: E402
from lora_train.engine.config.yaml_io import from_dict  # noqa: E402
from lora_train.engine.network import kohya_names, lora  # noqa: E402
from lora_train.engine.output.export import read_lora  # noqa: E402
from lora_train.engine.train.optim import param_groups  # noqa: E402
from lora_train.engine.train.progress import TrainCallbacks  # noqa: E402
from lora_train.engine.train.trainer import train  # noqa: E402
from lora_train.hosts.architectures import BY_FAMILY  # noqa: E402


def _modules(bundle, conv: bool) -> dict[str, torch.nn.Module]:
    return {t.kohya_key: t.root.get_submodule(t.path) for t in bundle.lora_targets(True, conv=conv)}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_file_applied_as_the_webui_does_gives_the_trained_outputs(name, model, request):
    _check_applied(name, model, request, real_webui=False)


@pytest.mark.skipif(not webui_networks.WEBUI_DIR, reason="set LORA_TRAIN_WEBUI_DIR to a stable-diffusion-webui tree")
@pytest.mark.parametrize("name", list(SPECS))
def test_the_webuis_own_network_modules_give_the_trained_outputs(name, request):
    """The same, with ΔW computed by the WebUI v1.10.1's network_lora/hada/lokr classes themselves."""
    _check_applied(name, "tiny", request, real_webui=True)


def _check_applied(name, model, request, real_webui: bool) -> None:
    bundle = request.getfixturevalue(model)
    spec = SPECS[name]
    pristine = copy.deepcopy(bundle)
    base = probe(pristine)
    network = trained_network(bundle, spec)
    trained = probe(bundle)
    tensors = lora.kohya_state_dict(network, torch.float32)
    lora.remove(network)
    webui_networks.apply(tensors, _modules(pristine, spec.conv_dim > 0), real_webui)
    applied = probe(pristine)
    for got, want, before in zip(applied, trained, base, strict=True):
        assert not torch.allclose(want, before, atol=1e-3)  # the network does change both outputs
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


# What each type's file holds per module (besides alpha) on the tiny model at rank 4 / conv_dim 4, under the
# names kohya's networks/lora.py (lora_down/lora_up) and LyCORIS's modules/loha.py, lokr.py (hada_w*_a/b;
# lokr_w1 full; lokr_w2 split as lokr_w2_a/b only where the rank is below half its larger side, which on the
# tiny model holds for none of these two modules) give them.
LINEAR_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV_KEY = "lora_unet_down_blocks_0_resnets_0_conv1"
FILE_TENSORS = {
    "LoCon": {"lora_down.weight", "lora_up.weight"},
    "LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "LoKr": {"lokr_w1", "lokr_w2"},
    "DoRA": {"lora_down.weight", "lora_up.weight", "dora_scale"},
}
CONV_TENSORS = {
    "LoCon": {"lora_down.weight", "lora_up.weight"},
    "LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "LoKr": {"lokr_w1", "lokr_w2"},
}
KOHYA_CONFIGS = {
    "LoCon": {"conv_dim": 4, "conv_alpha": 2},
    "LoHa": {"network_module": "lycoris.kohya", "network_args": ["algo=loha", "conv_dim=4", "conv_alpha=2"]},
    "LoKr": {"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=4", "conv_dim=4"],
             "lora_alpha": 8},
    "DoRA": {"network_module": "lycoris.kohya", "network_args": ["dora_wd=True"]},
}
# ss_network_args: kohya's train_network.py writes json.dumps of the network_args as "key": "value" strings;
# ours also names LyCORIS's algo (its default "lora") and the values in effect: LoKr's 3x3 modules are trained
# and stored at alpha = conv_dim (scale 1), so its conv_alpha says 4, and its alpha (ss_network_alpha) is the
# rank, not lora_alpha 8.
NETWORK_ARGS = {
    "LoCon": {"conv_dim": "4", "conv_alpha": "2"},
    "LoHa": {"algo": "loha", "conv_dim": "4", "conv_alpha": "2"},
    "LoKr": {"algo": "lokr", "conv_dim": "4", "conv_alpha": "4", "factor": "4"},
    "DoRA": {"algo": "lora", "dora_wd": "True"},
}
# (ss_network_alpha, the linear module's alpha tensor, the 3x3 module's alpha tensor or None)
ALPHAS = {"LoCon": (4.0, 4.0, 2.0), "LoHa": (4.0, 4.0, 2.0), "LoKr": (4.0, 4.0, 4.0), "DoRA": (4.0, 4.0, None)}


class Stop(TrainCallbacks):
    def __init__(self, step: int):
        self.step = step

    def should_stop(self):
        return getattr(self, "reached", False)

    def on_step(self, info):
        self.reached = info.step >= self.step


@pytest.mark.parametrize("name", list(KOHYA_CONFIGS))
def test_each_type_trains_resumes_exactly_and_continues_from_its_file(name, tiny, dataset_dir, tmp_path):
    settings = KOHYA_CONFIGS[name]
    straight = train(make_config(dataset_dir, tmp_path / "straight", max_train_steps=3, **settings),
                     copy.deepcopy(tiny))
    tensors, metadata = read_lora(straight.output)
    assert metadata["ss_network_module"] == settings.get("network_module", "networks.lora")
    assert json.loads(metadata["ss_network_args"]) == NETWORK_ARGS[name]
    parts = webui_networks.split_modules(tensors)
    assert set(parts[LINEAR_KEY]) - {"alpha"} == FILE_TENSORS[name]
    network_alpha, linear_alpha, conv_alpha = ALPHAS[name]
    assert float(metadata["ss_network_alpha"]) == network_alpha and float(parts[LINEAR_KEY]["alpha"]) == linear_alpha
    if conv_alpha is None:
        assert CONV_KEY not in parts
    else:
        assert set(parts[CONV_KEY]) - {"alpha"} == CONV_TENSORS[name]
        assert float(parts[CONV_KEY]["alpha"]) == conv_alpha
    assert all(torch.isfinite(t).all() for t in tensors.values())

    stopped = train(make_config(dataset_dir, tmp_path / "resumed", max_train_steps=3, **settings), tiny, Stop(2))
    assert stopped.stopped
    resumed = train(make_config(dataset_dir, tmp_path / "resumed", max_train_steps=3,
                                resume=str(tmp_path / "resumed" / "test-state"), **settings), tiny)
    assert_same_weights(straight.output, resumed.output)

    again = train(make_config(dataset_dir, tmp_path / "again", max_train_steps=1, network_weights=str(
        straight.output), learning_rate=1e-12, **settings), tiny)
    for tensor_name, tensor in read_lora(again.output)[0].items():
        torch.testing.assert_close(tensor, tensors[tensor_name], atol=1e-6, rtol=0)


def test_a_file_of_another_type_is_refused_by_name(tiny, dataset_dir, tmp_path):
    lora_file = train(make_config(dataset_dir, tmp_path / "a", max_train_steps=1), copy.deepcopy(tiny)).output
    with pytest.raises(ValueError, match="network_module/network_args"):
        train(make_config(dataset_dir, tmp_path / "b", max_train_steps=1, network_weights=str(lora_file),
                          **KOHYA_CONFIGS["LoHa"]), tiny)


@pytest.mark.parametrize(("values", "key", "words"), [
    ({"network_module": "networks.lycoris"}, "network_module", "not one of"),
    ({"network_args": ["algo=loha"]}, "network_module", "lycoris.kohya"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=ia3"]}, "network_args", "not supported"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo"]}, "network_args", "key=value"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=0"]}, "network_args", "factor"),
    ({"network_args": ["preset=attn-only"]}, "network_args", "preset"),
    ({"network_args": ["conv_dim=8"], "conv_dim": 4}, "conv_dim", "differs"),
    ({"network_args": ["dora_wd=maybe"]}, "network_args", "dora_wd"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=loha"], "lora_dropout": 0.1}, "lora_dropout",
     "dropout"),
    ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio", "greater than 0"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "conv_dim=4", "conv_alpha=2"]},
     "network_args", "conv_alpha does not apply to algo=lokr"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr"], "conv_dim": 4, "conv_alpha": 2},
     "conv_alpha", "scale 1"),
])
def test_bad_network_settings_name_their_key(values, key, words):
    with pytest.raises(ConfigError, match=words) as caught:
        from_dict(values)
    assert caught.value.key == key


def test_kohya_network_args_read_as_kohya_writes_them():
    cfg = from_dict({"network_module": "lycoris.kohya", "network_args": ["algo=locon", "conv_dim=8", "conv_alpha=4"]})
    assert cfg.network == NetworkSpec("lycoris.kohya", "lora", 8, 4.0)
    assert cfg.network.name == "LoCon"
    assert cfg.network.metadata_args() == {"algo": "locon", "conv_dim": "8", "conv_alpha": "4"}
    assert from_dict({"network_args": "dora_wd=True"}).network.name == "DoRA"
    assert from_dict({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=8"]}
                     ).network.metadata_args() == {"algo": "lokr", "factor": "8"}


# The tensors LoRA+ speeds up, by file name. kohya's networks/lora.py (48d368fa, prepare_optimizer_params)
# gives the ratio to every parameter whose name holds "lora_up". LyCORIS's kohya.py (f49d30d6) uses the same
# "lora_up" test, so its LoHa/LoKr get no LoRA+ at all; ours gives it to their output-side factors, the ones
# shaped [out, rank] as lora_up is (LyCORIS's modules/loha.py hada_w1_a/hada_w2_a, lokr.py lokr_w1_a/lokr_w2_a;
# lokr_w1 is a full factor on the tiny model, so only lokr_w2_a).
LORAPLUS_UP = {"LoRA": {"lora_up.weight"}, "LoHa": {"hada_w1_a", "hada_w2_a"}, "LoKr factor 4": {"lokr_w2_a"}}


@pytest.mark.parametrize("name", list(LORAPLUS_UP))
def test_loraplus_gives_the_up_factors_ratio_times_the_rate(name, tiny, dataset_dir, tmp_path):
    cfg = make_config(dataset_dir, tmp_path, learning_rate=1e-4, train_text_encoder=True, text_encoder_lr=5e-5,
                      loraplus_lr_ratio=16, loraplus_text_encoder_lr_ratio=4)
    network = lora.inject(tiny.lora_targets(True), 4, 2.0, 0.0, SPECS[name])
    try:
        groups = param_groups(cfg, network)
        assert [g["lr"] for g in groups] == pytest.approx([1e-4, 5e-5, 1.6e-3, 2e-4])
        names = {id(param): (key, tensor) for key in network.layers
                 for tensor, param in network.named_tensors(key).items()}
        assert sorted(id(p) for g in groups for p in g["params"]) == sorted(names)  # each tensor in one group
        for index, group in enumerate(groups):
            prefix = ("lora_unet", "lora_te")[index % 2]
            in_group = {names[id(p)] for p in group["params"]}
            assert all(key.startswith(prefix) for key, _ in in_group)
            tensors = {tensor for _, tensor in in_group}
            assert (tensors == LORAPLUS_UP[name]) if index >= 2 else not tensors & LORAPLUS_UP[name]
    finally:
        lora.remove(network)


# kohya sd-scripts 48d368fa (networks/lora.py create_network(1.0, 4, 1.0, None, [], unet, conv_dim=4,
# conv_alpha=1), one fresh process per model since it extends a class-level list) on meta-device UNets: its own
# library/original_unet.UNet2DConditionModel (SD1.5: sample_size 64, attention_head_dim 8, cross_attention_dim
# 768) and library/sdxl_original_unet.SdxlUNet2DConditionModel(). Count of UNet modules (3x3 convs among them)
# and the sha256 of their names sorted and joined with newlines.
KOHYA_LOCON = {
    "sd1": (278, 50, "620b9a8905915e2523fcef094d7ccb9a486a442de589c0435a3951c3509cdf95"),
    "sdxl": (788, 38, "6eaed2d7a4528e0a5cd7d54f06410bec8d1c8b707015310af1925b23533a4b69"),
}


def _full_unets(family: str) -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        return {"diffusers": UNet2DConditionModel(**BY_FAMILY[family].unet),
                "ldm": M.UNetModel(**_FULL_SD1) if family == "sd1" else M.SDXLUNetModel(**_FULL_SDXL)}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_size_locon_targets_are_kohyas_on_both_hosts(family):
    count, conv3x3, digest = KOHYA_LOCON[family]
    for layout, unet in _full_unets(family).items():
        targets = kohya_names.find_targets(unet, [], family, layout, 2, False, conv=True)
        keys = sorted(t.kohya_key for t in targets)
        assert len(keys) == count, layout
        assert sum(lora.is_conv3x3(t) for t in targets) == conv3x3
        assert hashlib.sha256("\n".join(keys).encode()).hexdigest() == digest, layout


@pytest.mark.skipif(not webui_networks.WEBUI_DIR, reason="set LORA_TRAIN_WEBUI_DIR to a stable-diffusion-webui tree")
def test_the_webui_finds_every_sd1_locon_key_on_its_ldm_unet():
    """SD1 files use diffusers block names; the WebUI's own converter must land each on an LDM module."""
    convert = webui_networks.webui_key_converter()
    unets = _full_unets("sd1")
    names = {"diffusion_model_" + name.replace(".", "_") for name, _ in unets["ldm"].named_modules()}
    keys = [t.kohya_key for t in kohya_names.find_targets(unets["diffusers"], [], "sd1", "diffusers", 2, False, True)]
    assert [key for key in keys if convert(key, False) not in names] == []


@pytest.mark.parametrize("name", list(SPECS))
def test_inspect_and_network_weights_checks_recognise_every_type(name, tiny, tmp_path):
    from safetensors.torch import save_file

    from lora_train.cli import describe
    from lora_train.engine import preflight

    spec = SPECS[name]
    network = lora.inject(tiny.lora_targets(False, conv=spec.conv_dim > 0), 4, 2.0, 0.0, spec)
    path = tmp_path / "net.safetensors"
    save_file(lora.kohya_state_dict(network, torch.float16), str(path), {"ss_base_model_version": "sd_v1"})
    lora.remove(network)
    info = describe(str(path))
    assert info["network"] == spec.name
    assert info["family"] == "sd_v1" and info["modules"]["unet"] > 0
    preflight.check_lora_family(path, "sd1")  # accepted as network_weights for an SD1 model


def test_the_tab_offers_the_network_type_and_its_arguments():
    from lora_train.webui import ui_fields

    assert ui_fields.INFOS["network_module"].choices == ("networks.lora", "lycoris.kohya")
    typed = {"network_module": "lycoris.kohya",
             "network_args": ui_fields._from_widget("network_args", "algo=lokr\n factor=8\n")}
    assert from_dict(typed).network == NetworkSpec("lycoris.kohya", "lokr", factor=8)
    assert ui_fields.to_widget("network_args", ["algo=loha", "conv_dim=8"]) == "algo=loha\nconv_dim=8"
