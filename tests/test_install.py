"""install.py: installs only what is missing, never touches the host's pinned packages, and is a fast no-op.

The fast tests run ``main`` with a stand-in for the WebUI's ``launch`` module. The slow one runs the real
install.py twice with real pip in a throwaway venv that sees this interpreter's packages (symlinked, so nothing
is copied) minus peft: the first run installs peft 0.13.2 and nothing else, the second does nothing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "install.py"


def _load_install():
    spec = importlib.util.spec_from_file_location("lora_train_install", INSTALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_launch(monkeypatch):
    calls: list[tuple[str, str]] = []
    launch = types.ModuleType("launch")

    def run_pip(command: str, desc: str = "") -> None:
        path = command.split(" -c ")[1].strip('"')
        calls.append((command, Path(path).read_text()))

    launch.run_pip = run_pip
    launch.is_installed = lambda name: True
    monkeypatch.setitem(sys.modules, "launch", launch)
    return calls


def test_uses_the_webui_pip_with_host_pins_as_constraints(fake_launch, monkeypatch, capsys) -> None:
    install = _load_install()
    versions = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "gradio": "3.41.2", "numpy": "1.26.2",
                "Pillow": "9.5.0", "diffusers": "0.26.3"}
    monkeypatch.setattr(install, "installed_version", lambda n: None if n == "peft" else versions.get(n, "1.0"))
    assert install.main() == 0
    (command, constraints), = fake_launch
    assert command.startswith('install "peft==0.13.2" -c ')
    assert "diffusers" not in command
    assert set(constraints.split()) == {f"{k}=={v}" for k, v in versions.items() if k != "diffusers"}
    assert capsys.readouterr().out.strip() == \
        "[sd-webui-lora-train] installed peft==0.13.2; no host package changed"


def test_nothing_missing_is_a_no_op(fake_launch, monkeypatch, capsys) -> None:
    install = _load_install()
    monkeypatch.setattr(install, "installed_version", lambda name: "1.0")
    start = time.perf_counter()
    assert install.main() == 0
    assert time.perf_counter() - start < 0.5
    assert fake_launch == []
    assert capsys.readouterr().out.strip() == "[sd-webui-lora-train] requirements present; nothing to install"


def _freeze(python: Path) -> set[str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return {line.strip().lower() for line in out.splitlines() if line.strip()}


@pytest.mark.slow
def test_real_install_twice_installs_peft_once_and_nothing_else(tmp_path: Path) -> None:
    source = Path(sysconfig.get_paths()["purelib"])
    if not (source / "pip").is_dir():
        pytest.skip("this interpreter's site-packages has no pip")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    for entry in source.iterdir():
        if entry.name == "peft" or entry.name.lower().startswith("peft-"):
            continue
        (target / entry.name).symlink_to(entry)
    before = _freeze(python)
    assert not any(line.startswith("peft==") for line in before)
    # Belt and braces for the symlinked packages: pip may not change any of them, whatever install.py asks.
    pins = tmp_path / "all-pins.txt"
    pins.write_text("\n".join(sorted(before)) + "\n")
    env = {**os.environ, "PIP_CONSTRAINT": str(pins), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)

    first = subprocess.run([str(python), str(INSTALL)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.strip().splitlines()[-1] == \
        "[sd-webui-lora-train] installed peft==0.13.2; no host package changed"
    after = _freeze(python)
    assert after - before == {"peft==0.13.2"} and before - after == set()
    assert (target / "peft").is_dir() and not (target / "peft").is_symlink()

    start = time.perf_counter()
    second = subprocess.run([str(python), str(INSTALL)], capture_output=True, text=True, env=env, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert second.returncode == 0 and second.stdout.strip() == \
        "[sd-webui-lora-train] requirements present; nothing to install"
    assert _freeze(python) == after
    assert elapsed < 10
