"""Path rules for the tab and the REST API: names, allowed roots, symlinks, outputs only in the Lora folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_train.engine.config.settings import ConfigError, TrainConfig
from lora_train.engine.files import free_name
from lora_train.webui.paths import SETTING_NAME, PathNotAllowed, PathPolicy, sanitize_name
from lora_train.webui.run_config import prepare_config


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("my_lora", "my_lora"),
        ("a/b\\c", "a_b_c"),
        ("../../etc/passwd", "_.._etc_passwd".replace("..", ".")),
        ("..", "lora"),
        ("  spaced name. ", "spaced name"),
        ("CON", "_CON"),
        ("nul.safetensors", "_nul.safetensors"),
        ("com1", "_com1"),
        ("what?*<>|:", "what______"),
        ("x" * 300, "x" * 100),
    ],
)
def test_sanitize_name(raw: str, expected: str) -> None:
    assert sanitize_name(raw, fallback="lora") == expected


def test_sanitize_name_without_fallback_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        sanitize_name("///")
    assert info.value.key == "output_name"


def test_sanitized_names_never_escape(tmp_path: Path) -> None:
    for raw in ("../x", "..\\x", "/abs", "a/../../b", "....", ". .", "\x00null"):
        name = sanitize_name(raw, fallback="lora")
        target = (tmp_path / f"{name}.safetensors").resolve()
        assert target.parent == tmp_path.resolve(), raw


def _policy(tmp_path: Path) -> PathPolicy:
    (tmp_path / "webui" / "models" / "Lora").mkdir(parents=True)
    (tmp_path / "extra").mkdir()
    return PathPolicy.for_webui(tmp_path / "webui", tmp_path / "webui" / "models" / "Lora",
                                tmp_path / "webui" / "outputs" / "lora-train", [str(tmp_path / "extra")])


def test_inputs_inside_roots_pass_and_outside_are_refused_naming_the_setting(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    assert policy.check_input(tmp_path / "webui" / "data", "train_data_dir") == (tmp_path / "webui/data").resolve()
    assert policy.check_input(tmp_path / "extra" / "set", "train_data_dir")
    with pytest.raises(PathNotAllowed) as info:
        policy.check_input(tmp_path / "elsewhere", "reg_data_dir")
    assert info.value.key == "reg_data_dir"
    assert SETTING_NAME in str(info.value)
    with pytest.raises(PathNotAllowed):
        policy.check_input(tmp_path / "webui" / ".." / "elsewhere", "train_data_dir")


def test_symlinks_are_resolved_before_the_check(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    outside = tmp_path / "secret"
    outside.mkdir()
    link = tmp_path / "webui" / "innocent"
    os.symlink(outside, link)
    with pytest.raises(PathNotAllowed):
        policy.check_input(link, "train_data_dir")
    with pytest.raises(PathNotAllowed):
        policy.check_input(link / "child", "train_data_dir")


def test_outputs_only_in_the_lora_and_run_folders(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    lora = tmp_path / "webui" / "models" / "Lora"
    assert policy.check_output(lora / "sub", "output_dir")
    assert policy.check_output(tmp_path / "webui" / "outputs" / "lora-train" / "run", "output_dir")
    with pytest.raises(PathNotAllowed) as info:
        policy.check_output(tmp_path / "webui", "output_dir")
    assert info.value.key == "output_dir"


def test_prepare_config_puts_outputs_in_the_run_folder_and_checks_every_path(tmp_path: Path, dataset_dir) -> None:
    policy = PathPolicy(output_root=tmp_path / "Lora", input_roots=[dataset_dir.parent], work_root=tmp_path / "runs")
    cfg = prepare_config({"train_data_dir": str(dataset_dir), "output_name": "con", "output_dir": "/etc"}, policy)
    assert Path(cfg.output_dir) == tmp_path / "runs" and cfg.output_name == "_con"
    with pytest.raises(ConfigError) as refused:  # a path as the name: refused as the CLI refuses it, not renamed
        prepare_config({"train_data_dir": str(dataset_dir), "output_name": "../evil"}, policy)
    assert refused.value.key == "output_name"
    for key in ("reg_data_dir", "network_weights", "metadata_path", "resume"):
        with pytest.raises(PathNotAllowed) as info:
            prepare_config({"train_data_dir": str(dataset_dir), key: "/etc/passwd"}, policy)
        assert info.value.key == key
    with pytest.raises(ConfigError) as info:
        prepare_config({"train_data_dir": ""}, policy)
    assert info.value.key == "train_data_dir"


def test_prepare_config_never_reuses_an_existing_name(tmp_path: Path, dataset_dir) -> None:
    root = tmp_path / "Lora"
    root.mkdir()
    (root / "mine.safetensors").write_bytes(b"x")
    (tmp_path / "runs" / "mine-2-state").mkdir(parents=True)  # a run that crashed before its LoRA was written
    cfg = prepare_config(TrainConfig(train_data_dir=str(dataset_dir), output_name="mine"),
                         PathPolicy(output_root=root, work_root=tmp_path / "runs"))
    assert cfg.output_name == "mine-3" and not cfg.overwrite


def test_prepare_config_uses_metadata_csv_when_present(tmp_path: Path, dataset_dir) -> None:
    (dataset_dir / "metadata.csv").write_text("filename,prompt\n", encoding="utf-8")
    cfg = prepare_config({"train_data_dir": str(dataset_dir)}, PathPolicy(output_root=tmp_path))
    assert cfg.metadata_path == str((dataset_dir / "metadata.csv").resolve())


def test_free_folder_name(tmp_path: Path) -> None:
    assert free_name(tmp_path, "a") == "a"
    (tmp_path / "a").mkdir()
    (tmp_path / "a-2").mkdir()
    assert free_name(tmp_path, "a") == "a-3"
