"""Every bad input fails before a model loads, with one line naming the file or key and what to do.

The bad files are built here: a truncated and a random-bytes .safetensors, a LoRA given as base_model, a
checkpoint given as network_weights, a LoRA of another family, a pickled .ckpt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_train import cli
from lora_train.engine import preflight
from lora_train.engine.config.settings import ConfigError, TrainConfig
from lora_train.hosts.base_model import base_model_family

SD1_UNET_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SDXL_TE2_KEY = "lora_te2_text_model_encoder_layers_0_mlp_fc1"


def write_checkpoint(path: Path, family: str = "sd1") -> Path:
    """Tensor names and shapes of an A1111 checkpoint (values do not matter to the header checks)."""
    width = {"sd1": 768, "sd2": 1024}[family]
    tensors = {
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, width),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
    }
    text = "cond_stage_model.transformer.text_model.final_layer_norm.weight" if family == "sd1" else \
        "cond_stage_model.model.ln_final.weight"
    tensors[text] = torch.zeros(width)
    save_file(tensors, str(path))
    return path


def write_lora(path: Path, keys: list[str], width: int = 32, metadata: dict[str, str] | None = None) -> Path:
    tensors = {}
    for key in keys:
        tensors[f"{key}.lora_down.weight"] = torch.zeros(4, width)
        tensors[f"{key}.lora_up.weight"] = torch.zeros(width, 4)
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata)
    return path


def cfg_with(dataset_dir: Path, tmp_path: Path, **values) -> TrainConfig:
    return TrainConfig(train_data_dir=str(dataset_dir), output_dir=str(tmp_path / "out"), **values)


def run_cli(tmp_path: Path, monkeypatch, capsys, yaml_text: str) -> str:
    """``python -m lora_train train`` in-process; returns stderr after asserting exit 2 and no model load."""
    def no_model(cfg):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr("lora_train.hosts.diffusers.load_model", no_model)
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# -------------------------------------------------------------------------------------------- base_model


def test_truncated_random_and_pickled_base_models_name_the_file(tmp_path):
    good = write_checkpoint(tmp_path / "good.safetensors")
    assert base_model_family(str(good)) == "sd1"
    assert base_model_family(str(write_checkpoint(tmp_path / "v2.safetensors", "sd2"))) == "sd2"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "callback": ValueError("runs code")}, pickled)
    garbage_ckpt = tmp_path / "garbage.ckpt"
    garbage_ckpt.write_bytes(b"\x80\x02not really a pickle" * 10)
    for path, words in ((truncated, "download or export it again"), (noise, "download or export it again"),
                        (pickled, "Convert it to .safetensors"), (garbage_ckpt, "download or export it again")):
        with pytest.raises(ConfigError) as err:
            base_model_family(str(path))
        assert err.value.key == "base_model"
        assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_zip_ckpt_family_is_read_without_loading_it(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2),
                               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}}, path)
    assert base_model_family(str(path)) == "sdxl"


def test_lora_or_other_file_as_base_model_says_what_it_is(tmp_path):
    lora = write_lora(tmp_path / "style.safetensors", [SD1_UNET_KEY])
    with pytest.raises(ConfigError, match=r"style\.safetensors is a LoRA .*not a Stable Diffusion checkpoint.*"
                                          r"network_weights"):
        base_model_family(str(lora))
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(2), "decoder.conv_in.weight": torch.zeros(2)},
              str(vae))
    with pytest.raises(ConfigError, match=r"vae\.safetensors is a VAE"):
        base_model_family(str(vae))
    refiner = tmp_path / "refiner.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2),
               "conditioner.embedders.0.model.ln_final.weight": torch.zeros(2)}, str(refiner))
    with pytest.raises(ConfigError, match=r"refiner\.safetensors is an SDXL refiner checkpoint"):
        base_model_family(str(refiner))
    with pytest.raises(ConfigError, match="not a diffusers model"):
        base_model_family(str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        base_model_family(str(tmp_path / "missing.safetensors"))


# --------------------------------------------------------------------------------------- network_weights


def test_network_weights_must_be_a_lora_of_the_models_family(tmp_path):
    sd1 = write_lora(tmp_path / "sd1.safetensors", [SD1_UNET_KEY])
    preflight.check_lora_family(sd1, "sd1")
    sdxl = write_lora(tmp_path / "xl.safetensors", [SDXL_TE2_KEY])
    with pytest.raises(ConfigError, match=r"xl\.safetensors is a LoRA for SDXL, but the model is SD1"):
        preflight.check_lora_family(sdxl, "sd1")
    with pytest.raises(ConfigError, match=r"sd1\.safetensors is a LoRA for SD1/SD2, but the model is SDXL"):
        preflight.check_lora_family(sd1, "sdxl")
    tagged = write_lora(tmp_path / "v2.safetensors", [SD1_UNET_KEY], metadata={"ss_base_model_version": "sd_v2"})
    with pytest.raises(ConfigError, match="for SD2, but the model is SD1"):
        preflight.check_lora_family(tagged, "sd1")
    wide = write_lora(tmp_path / "wide.safetensors", [SD1_UNET_KEY], width=1024)  # SD2's cross-attention width
    with pytest.raises(ConfigError, match="for SD2"):
        preflight.check_lora_family(wide, "sd1")
    flux = write_lora(tmp_path / "flux.safetensors", ["lora_unet_double_blocks_0_img_attn_qkv"])
    with pytest.raises(ConfigError, match=r"flux\.safetensors is a LoRA for another architecture"):
        preflight.check_lora_family(flux, "sd1")


def test_checkpoint_or_damaged_file_as_network_weights_names_it(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model\.safetensors is a full SD1 checkpoint, not a LoRA; use it as "
                                          "base_model"):
        preflight.check_lora_family(checkpoint, "sd1")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"{}")
    with pytest.raises(ConfigError, match=r"broken\.safetensors is not a \.safetensors file we can read"):
        preflight.check_lora_family(broken, "sd1")
    with pytest.raises(ConfigError, match=r"lora\.ckpt: a LoRA is read from a \.safetensors"):
        (tmp_path / "lora.ckpt").write_bytes(b"x")
        preflight.check_lora_family(tmp_path / "lora.ckpt", "sd1")


def test_cli_rejects_wrong_network_weights_before_loading_the_model(tmp_path, dataset_dir, monkeypatch, capsys):
    xl = write_lora(tmp_path / "xl.safetensors", [SDXL_TE2_KEY])
    err = run_cli(tmp_path, monkeypatch, capsys,
                  f"base_model: tiny\ntrain_data_dir: {dataset_dir}\nnetwork_weights: xl.safetensors\n")
    assert str(xl) in err and "SDXL" in err


def test_cli_rejects_a_lora_as_base_model(tmp_path, dataset_dir, monkeypatch, capsys):
    write_lora(tmp_path / "style.safetensors", [SD1_UNET_KEY])
    err = run_cli(tmp_path, monkeypatch, capsys, f"base_model: style.safetensors\ntrain_data_dir: {dataset_dir}\n")
    assert "style.safetensors is a LoRA" in err


def test_inspect_of_a_non_lora_is_one_line(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "model.safetensors")
    assert cli.main(["inspect", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is a full SD1 checkpoint" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------- options and packages


@pytest.mark.parametrize(("values", "package", "key"), [
    ({"optimizer": "adamw8bit"}, "bitsandbytes", "optimizer"),
    ({"optimizer": "prodigy"}, "prodigyopt", "optimizer"),
    ({"logging_dir": "logs"}, "tensorboard", "logging_dir"),
])
def test_missing_optional_package_is_a_config_error(tmp_path, dataset_dir, monkeypatch, values, package, key):
    real = preflight.find_spec
    monkeypatch.setattr(preflight, "find_spec", lambda name: None if name == package else real(name))
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg_with(dataset_dir, tmp_path, **values), "sd1")
    assert err.value.key == key and package in str(err.value)


def test_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU") as err:
        preflight.check_device("cuda")
    assert err.value.key == "device"
    with pytest.raises(ConfigError, match="is not a device"):
        preflight.check_device("gpu0")
    preflight.check_device("cpu")


def test_sample_prompts_file_is_checked_before_training(tmp_path, dataset_dir):
    cfg = cfg_with(dataset_dir, tmp_path, sample_prompts=[str(tmp_path / "prompts.txt")], sample_every_n_steps=5)
    with pytest.raises(ConfigError, match=r"prompts\.txt not found"):
        preflight.check(cfg, "sd1")
    (tmp_path / "prompts.txt").write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="has no prompts"):
        preflight.check(cfg, "sd1")
    (tmp_path / "prompts.txt").write_bytes("une tête\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"prompts\.txt is not UTF-8 text.*re-save it as UTF-8"):
        preflight.check(cfg, "sd1")


def test_resume_folder_that_does_not_exist_says_so(tmp_path, dataset_dir):
    missing = tmp_path / "out" / "lora-state"
    with pytest.raises(ConfigError, match="does not exist"):
        preflight.check(cfg_with(dataset_dir, tmp_path, resume=str(missing)), "sd1")
    missing.mkdir(parents=True)
    with pytest.raises(ConfigError, match="has no state.json"):
        preflight.check(cfg_with(dataset_dir, tmp_path, resume=str(missing)), "sd1")
    (missing / "state.json").write_text("{truncated")
    with pytest.raises(ConfigError, match="damaged"):
        preflight.check(cfg_with(dataset_dir, tmp_path, resume=str(missing)), "sd1")
    (missing / "state.json").write_text(json.dumps({"step": 4}))
    preflight.check(cfg_with(dataset_dir, tmp_path, resume=str(missing)), "sd1")


def test_cli_names_a_missing_prompts_file_without_training(tmp_path, dataset_dir, monkeypatch, capsys):
    err = run_cli(tmp_path, monkeypatch, capsys, f"base_model: tiny\ntrain_data_dir: {dataset_dir}\n"
                  f"output_dir: out\nsample_prompts: prompts.txt\nsample_every_n_steps: 2\n")
    assert str(tmp_path / "prompts.txt") in err
    assert not (tmp_path / "out").exists()


def test_cli_names_a_non_utf8_caption(tmp_path, dataset_dir, monkeypatch, capsys):
    caption = dataset_dir / "00_red_circle.txt"
    caption.write_bytes("cercle rouge, tête".encode("cp1252"))
    err = run_cli(tmp_path, monkeypatch, capsys, f"base_model: tiny\ntrain_data_dir: {dataset_dir}\n")
    assert str(caption) in err and "re-save it as UTF-8" in err


def test_preflight_runs_where_diffusers_is_missing(dataset_dir):
    """The WebUI's venv has no diffusers: the job runner's checks must not import it."""
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from lora_train.engine import preflight\nfrom lora_train.engine.config.settings import TrainConfig\n"
            "preflight.check(TrainConfig(train_data_dir=sys.argv[1]), 'sd1')\n")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code, str(dataset_dir)], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
