"""``pip install .`` gives a working ``lora-train`` command that runs from any folder (no repository needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_command_trains_from_outside_the_repository(tmp_path):
    # The sources alone (what a user downloads), so no build/ folder from an earlier run leaks into the wheel.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "lora_train", source / "lora_train", ignore=shutil.ignore_patterns("__pycache__"))
    # A fresh venv that sees the test venv's packages (torch, diffusers, pip, setuptools) but not the repository.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    install = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps",
                              "--no-build-isolation", "--no-index", str(source)],
                             cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    installed = site / "lora_train"
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth"))) == ["lora_train"]
    assert (installed / "caption" / "vocab" / "subject.txt").is_file()
    assert (installed / "llm" / "tiny-llm" / "config.json").is_file()
    command = venv / "bin" / "lora-train"

    shown = subprocess.run([command, "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: lora-train") and shown.stderr == ""

    config = (ROOT / "examples" / "tiny.yaml").read_text()
    config = config.replace("../lora_train/sample_data", str(installed / "sample_data")).replace("../output", "out")
    (work / "tiny.yaml").write_text(config)
    trained = subprocess.run([command, "train", "--config", "tiny.yaml", "--set", "max_train_steps=2"], cwd=work,
                             env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert "done: 2/2" in trained.stdout and (work / "out" / "tiny-shapes.safetensors").is_file()
    assert "Warning" not in trained.stderr and "gemm_4bit" not in trained.stderr


@pytest.mark.slow
def test_setup_venv_installs_this_checkout_editable_so_it_runs_from_any_folder(tmp_path):
    """The step every tools/setup_venv.sh mode ends with, on a venv that sees the test venv's packages: the
    checkout is installed editable and nothing else changes; then `python -m lora_train` and `lora-train` run
    from another folder with a config given by absolute path."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # offline: the build backend is the test venv's setuptools (PIP_NO_BUILD_ISOLATION=0 means "do not isolate")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {
        "HF_HUB_OFFLINE": "1", "VENV": str(venv), "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}

    def freeze(*where: str) -> set[str]:
        listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check",
                                 *where], env=env, check=True, capture_output=True, text=True).stdout
        return set(listed.split())

    # the test venv itself may hold this project (setup_venv.sh --test installs it), so what the step adds is
    # read from the new venv's own site-packages, and what it must leave alone from everything the venv sees
    seen_before, own_before = freeze(), freeze("--path", str(site))
    setup = subprocess.run(["bash", str(ROOT / "tools" / "setup_venv.sh"), "--project"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert freeze("--path", str(site)) - own_before == {"sd-webui-lora-train==0.1.0"}
    assert seen_before - {"sd-webui-lora-train==0.1.0"} <= freeze()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = (ROOT / "examples" / "tiny.yaml").read_text()
    shutil.copytree(ROOT / "lora_train" / "sample_data", tmp_path / "images")
    config = config.replace("../lora_train/sample_data", str(tmp_path / "images"))
    (elsewhere / "x.yaml").write_text(config.replace("../output", str(tmp_path / "out")))
    run_dir = tmp_path / "somewhere-else"
    run_dir.mkdir()
    where = subprocess.run([python, "-c", "import lora_train; print(lora_train.__file__)"], cwd=run_dir, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()) == ROOT / "lora_train" / "__init__.py"  # editable: this checkout runs
    shown = subprocess.run([venv / "bin" / "lora-train", "--help"], cwd=run_dir, env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: lora-train"), shown.stderr
    trained = subprocess.run([python, "-m", "lora_train", "train", "--config", str(elsewhere / "x.yaml"), "--set",
                              "max_train_steps=1"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert "done: 1/1" in trained.stdout and (tmp_path / "out" / "tiny-shapes.safetensors").is_file()
