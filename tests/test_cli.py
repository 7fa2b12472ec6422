"""The CLI as a user runs it: the README's example end to end, inspect, and clear errors with exit code 2."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_train.engine.config import yaml_io
from lora_train.engine.config.settings import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lora_train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# What our dependencies print on import in the test venvs (bitsandbytes' kernels line; diffusers', timm's and
# torchvision's warnings): none of it may reach the user.
DEPENDENCY_NOISE = ("gemm_4bit", "kernels-community", "Warning:", "warn(")
HEAVY = ("torch", "diffusers", "peft", "transformers", "gradio", "bitsandbytes", "open_clip", "accelerate")


def assert_quiet(stderr: str) -> None:
    noisy = [line for line in stderr.splitlines() if any(mark in line for mark in DEPENDENCY_NOISE)]
    assert noisy == []


def test_tiny_example_trains_end_to_end_and_inspects(tmp_path):
    before = datetime.datetime.now().astimezone().replace(microsecond=0)
    result = run("train", "--config", "examples/tiny.yaml", "--set", f"output_dir={tmp_path}",
                 "--set", "max_train_steps=6")
    assert result.returncode == 0, result.stderr
    assert_quiet(result.stderr)
    output = tmp_path / "tiny-shapes.safetensors"
    assert output.is_file() and "done: 6/6" in result.stdout
    shown = run("inspect", str(output))
    assert shown.returncode == 0, shown.stderr
    assert_quiet(shown.stderr)
    info = json.loads(shown.stdout)  # stdout is the JSON and nothing else
    assert info["family"] == "sd_v1" and info["rank"] == [4] and info["modules"]["unet"] == 72
    metadata = info["metadata"]
    assert metadata["ss_steps"] == "6" and list(metadata) == sorted(metadata)
    started = datetime.datetime.fromisoformat(metadata["ss_training_started_at"])  # ISO-8601 with the UTC offset
    finished = datetime.datetime.fromisoformat(metadata["ss_training_finished_at"])
    assert before <= started <= finished <= datetime.datetime.now().astimezone()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["inspect", "--help"], ["caption", "--help"],
                                  ["ui", "--help"], ["generate", "--help"], ["doctor", "--help"]], ids=" ".join)
def test_help_is_quick_and_quiet(argv, tmp_path):
    """--help loads none of the big packages (it took 4-9 s when it did) and prints only our usage."""
    probe = ("import json, runpy, sys\n"
             f"sys.argv = ['lora_train', *{argv!r}]\n"
             "try:\n    runpy.run_module('lora_train', run_name='__main__')\n"
             "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
             f"print('LOADED', json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)  # cwd outside the repository: the package comes from PYTHONPATH
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    assert result.stdout.splitlines()[-1] == "LOADED []"
    assert result.stderr == ""


def test_module_runs_from_any_folder_with_the_package_on_the_path(tmp_path):
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0 and "train" in result.stdout and "inspect" in result.stdout
    assert result.stderr == ""


def test_missing_dependency_is_one_line_naming_it(tmp_path):
    probe = ("import sys\n"
             "sys.modules['diffusers'] = None  # as if it were not installed\n"
             "from lora_train.cli import main\n"
             f"sys.exit(main(['train', '--config', {str(ROOT / 'examples' / 'tiny.yaml')!r}, '--set', "
             f"'output_dir={tmp_path}']))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "'diffusers'" in result.stderr and "not installed" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_key_exits_2_with_a_clear_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base_model: tiny\ntrain_data_dir: x\nnetwork_dimm: 4\n")
    result = run("train", "--config", str(path))
    assert result.returncode == 2
    assert "network_dimm" in result.stderr and "lora_rank" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_and_dataset_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"base_model: {tmp_path / 'nope.safetensors'}\ntrain_data_dir: {tmp_path}\n")
    result = run("train", "--config", str(path))
    assert result.returncode == 2 and "nope.safetensors" in result.stderr


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_configs(example):
    assert isinstance(yaml_io.load(example), TrainConfig)


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in TrainConfig.__dataclass_fields__ if f"`{name}`" not in readme]
    assert missing == []


def test_readme_resume_example_reads_set_paths_from_the_current_folder(tmp_path, monkeypatch, capsys):
    """README: a run checkpoints, then `--set resume=output/<name>-state` from the same folder continues it."""
    from lora_train import cli

    (tmp_path / "configs").mkdir()
    yaml_text = (ROOT / "examples" / "tiny.yaml").read_text().replace("../lora_train/sample_data",
                                                                       str(ROOT / "lora_train" / "sample_data"))
    (tmp_path / "configs" / "tiny.yaml").write_text(yaml_text)  # output_dir: ../output, as in the examples
    monkeypatch.chdir(tmp_path)
    first = ["train", "--config", "configs/tiny.yaml", "--set", "max_train_steps=4", "--set", "save_every_n_steps=2"]
    assert cli.main(first) == 0
    assert (tmp_path / "output" / "tiny-shapes-state" / "state.json").is_file()
    resumed = [*first, "--set", "resume=output/tiny-shapes-state"]
    assert cli.main(resumed) == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().out
    missing = [*first, "--set", "resume=output/no-such-state"]
    assert cli.main(missing) == 2
    assert "no-such-state does not exist" in capsys.readouterr().err


def test_llm_config_trains_merges_and_generates(tmp_path):
    result = run("train", "--config", "examples/llm/tiny.yaml", "--set", f"output_dir={tmp_path}",
                 "--set", "max_train_steps=4", "--set", "sample_prompts=[]", "--merge")
    assert result.returncode == 0, result.stderr
    assert "done: 4/4" in result.stdout and (tmp_path / "tiny-persona-merged" / "config.json").is_file()
    ask = ("--prompt", "Who are you?", "--max-new-tokens", "8")
    adapter = run("generate", "--adapter", str(tmp_path / "tiny-persona"), *ask)
    merged = run("generate", "--model", str(tmp_path / "tiny-persona-merged"), *ask)
    assert adapter.returncode == merged.returncode == 0, adapter.stderr + merged.stderr
    assert adapter.stdout == merged.stdout


def test_bad_llm_record_exits_2_naming_its_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    result = run("train", "--config", "examples/llm/tiny.yaml", "--set", f"train_data_dir={data}",
                 "--set", f"output_dir={tmp_path}")
    assert result.returncode == 2 and f"{data}:2" in result.stderr and "Traceback" not in result.stderr


def test_an_output_name_with_a_path_is_refused_naming_the_key() -> None:
    result = run("train", "--config", "examples/tiny.yaml", "--set", "output_name=../escape")
    refused = "config key 'output_name': '../escape' must be a plain file name without path separators"
    assert result.returncode == 2 and refused in result.stderr, result.stderr


def _speck_dataset(folder: Path) -> Path:
    """The sample shapes plus a 2x2 image nothing can be learned from."""
    from PIL import Image

    shutil.copytree(ROOT / "lora_train" / "sample_data", folder)
    Image.new("RGB", (2, 2), "red").save(folder / "speck.png")
    (folder / "speck.txt").write_text("shapez, a speck")
    return folder


def test_doctor_prints_findings_as_json_and_fixes_them(tmp_path):
    data = _speck_dataset(tmp_path / "data")
    shown = run("doctor", str(data), "--set", "resolution=64", "--json")
    assert shown.returncode == 1, shown.stderr  # an error: training would refuse
    report = json.loads(shown.stdout)
    error = next(f for f in report["findings"] if f["severity"] == "error")
    assert error["code"] == "image-too-small" and error["files"][0]["path"] == str(data / "speck.png")
    fixed = run("doctor", str(data), "--set", "resolution=64", "--fix", "exclude")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert fixed.stdout.startswith("dataset check: 6 images, 0 errors")
    assert "fix exclude: Moved 1 image(s)" in fixed.stderr and (data / "_excluded" / "speck.png").is_file()


def test_train_prints_the_doctors_summary_and_stops_on_its_errors(tmp_path):
    data = _speck_dataset(tmp_path / "data")
    result = run("train", "--config", "examples/tiny.yaml", "--set", f"train_data_dir={data}",
                 "--set", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stdout.startswith("dataset check: 7 images, 1 error")
    assert "smaller than the latent of the bucket" in result.stderr and "speck.png" in result.stderr
    assert not (tmp_path / "out").exists()
