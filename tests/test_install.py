"""install.py: installs only what is missing, pins every installed package, undoes a broken install, one line.

The fast tests run ``main`` with a stand-in for the WebUI's ``launch`` module and a stand-in venv (a dict of
installed versions). The slow one runs the real install.py twice with real pip in a throwaway venv that sees
this interpreter's packages (symlinked, so nothing is copied) minus peft: the first run installs peft 0.13.2 and
nothing else, the second does nothing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "install.py"
# what a WebUI venv holds, odd entries included: a CUDA local version, a URL install, '_' and '.' in names
WEBUI = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "protobuf": "3.20.0", "huggingface-hub": "0.36.2",
         "clip": "1.0", "typing-extensions": "4.16.0", "zope-interface": "7.2", "safetensors": "0.4.2",
         "pyyaml": "6.0.4", "tqdm": "4.70.1", "open-clip-torch": "2.20.0", "numpy": "1.26.2", "packaging": "26.4",
         "psutil": "5.9.5", "accelerate": "0.21.0", "scipy": "1.16.3", "pywavelets": "1.9.0", "pillow": "9.5.0",
         "imagehash": "4.3.2"}  # the tests below follow peft; ImageHash (the other REQUIRED) has its own test
# Requires-Dist of ImageHash 4.3.2 (PyPI, ImageHash-4.3.2-py2.py3-none-any.whl)
IMAGEHASH_REQUIRES = ["PyWavelets", "numpy", "pillow", "scipy"]
# Requires-Dist of peft 0.13.2 as its wheel's METADATA has them (PyPI, peft-0.13.2-py3-none-any.whl)
PEFT_REQUIRES = ["numpy>=1.17", "packaging>=20.0", "psutil", "pyyaml", "torch>=1.13.0", "transformers", "tqdm",
                 "accelerate>=0.21.0", "safetensors", "huggingface-hub>=0.17.0", 'black; extra == "dev"',
                 'pytest; extra == "test"', 'diffusers<0.21.0; extra == "test"']
# pip's refusal in the reForge build, whose torch wants a setuptools the venv does not have (pip check says so)
INCONSISTENT = ("ERROR: Cannot install torch==2.14.1 because these package versions have conflicting "
                "dependencies.\nERROR: ResolutionImpossible: for help visit https://pip.pypa.io")


def _load(path: Path = INSTALL):
    """install.py or a tools/ script as a fresh module (neither is a package)."""
    spec = importlib.util.spec_from_file_location(f"lora_train_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A wheel holding only its METADATA, named as pip names wheels."""
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    metadata = "".join(f"Requires-Dist: {line}\n" for line in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                         f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{metadata}")
    return path


class FakeVenv:
    """The venv install.py sees, and pip over it (``launch.run_pip``).

    ``download --no-deps`` writes the wheels of ``index`` (name -> version, Requires-Dist); ``install --no-deps``
    adds wheels as they are; the resolver (``install`` without ``--no-deps``) adds ``adds``, or fails with
    ``pip_output`` (``refuses`` limits that to resolver runs naming one of those requirements). Uninstall removes.
    """

    def __init__(self, monkeypatch, installed: dict[str, str], adds: dict[str, str], pip_output: str = "",
                 index: dict[str, tuple[str, list[str]]] | None = None, refuses: tuple[str, ...] = ()):
        self.installed = dict(installed)
        self.adds, self.pip_output, self.refuses = adds, pip_output, refuses
        self.index = {"peft": ("0.13.2", PEFT_REQUIRES), **(index or {})}
        self.pip_calls: list[tuple[str, str]] = []  # (command, constraints file text)
        self.uninstalled: list[str] = []
        self.install = _load()
        launch = types.ModuleType("launch")
        launch.run_pip = self.run_pip
        monkeypatch.setitem(sys.modules, "launch", launch)
        monkeypatch.setattr(self.install, "installed_distributions", lambda: dict(self.installed))
        monkeypatch.setattr(self.install, "python_pip", self.python_pip)
        monkeypatch.setattr(self.install, "import_failure", lambda: None)

    @property
    def resolver_calls(self) -> list[list[str]]:
        """The requirements of each pip install that ran the resolver."""
        calls = [shlex.split(command) for command, _ in self.pip_calls]
        return [[a for a in args[1:args.index("-c")]] for args in calls if args[0] == "install" and
                "--no-deps" not in args]

    @property
    def no_deps_installs(self) -> list[list[str]]:
        """The requirements of each ``pip install --no-deps`` (taken from the fetched wheels' folder)."""
        calls = [shlex.split(command) for command, _ in self.pip_calls]
        return [self._named(args) for args in calls if args[:2] == ["install", "--no-deps"]]

    @staticmethod
    def _named(args: list[str]) -> list[str]:
        """The requirements of a ``pip install`` command line (its options and their values left out)."""
        named, skip = [], False
        for arg in args[1:args.index("-c")]:
            if skip or arg.startswith("-"):
                skip = arg in ("--find-links", "-d")
                continue
            named.append(arg)
        return named

    def run_pip(self, command: str, desc: str = "") -> None:
        args = shlex.split(command)
        constraints = Path(args[args.index("-c") + 1]).read_text() if "-c" in args else ""
        self.pip_calls.append((command, constraints))
        if args[0] == "download":
            folder = Path(args[args.index("-d") + 1])
            for requirement in [a for a in args[1:] if not a.startswith("-") and a != str(folder)]:
                name = Requirement(requirement).name
                version, requires = self.index.get(name, ("1.0", []))
                fake_wheel(folder, name, version, requires)
            return
        assert args[0] == "install", command
        if "--no-deps" in args:
            assert "--no-index" in args and "--find-links" in args, command  # by name, from the fetched wheels
            folder = Path(args[args.index("--find-links") + 1])
            for requirement in self._named(args):
                (wheel,) = folder.glob(f"{Requirement(requirement).name.replace('-', '_')}-*.whl")
                name, version = wheel.name.split("-")[:2]
                self.installed[name.replace("_", "-").lower()] = version
            return
        wanted = args[1:args.index("-c")]
        if self.pip_output and (not self.refuses or any(r in wanted for r in self.refuses)):
            raise RuntimeError(f"Couldn't install {desc}.\nCommand: pip {command}\nstdout: {self.pip_output}")
        self.installed.update(self.adds)

    def python_pip(self, args: list[str]) -> None:
        assert args[:2] == ["uninstall", "-y"]
        self.uninstalled += args[2:]
        for name in args[2:]:
            self.installed.pop(name)


def test_installs_only_peft_with_every_installed_package_pinned(monkeypatch, capsys) -> None:
    venv = FakeVenv(monkeypatch, WEBUI, adds={})
    assert venv.install.main([]) == 0
    (download, _), (command, constraints) = venv.pip_calls
    assert download.startswith('download "--no-deps" "--only-binary=:all:" "-d" ') and '"peft==0.13.2"' in download
    # everything peft needs is there at versions it accepts: its wheel alone, no resolver
    assert venv.resolver_calls == [] and venv.no_deps_installs == [["peft==0.13.2"]]
    assert "tensorboard" not in command and "diffusers" not in command and "bitsandbytes" not in command
    pins = [Requirement(line) for line in constraints.split()]
    # every installed package, and only those, pinned to exactly its installed version
    assert sorted(p.name for p in pins) == sorted(WEBUI)
    assert all(p.specifier.contains(WEBUI[p.name], prereleases=True) for p in pins)
    assert not any(p.specifier.contains("2.1.2", prereleases=True) for p in pins if p.name == "torch")
    assert capsys.readouterr().out == "[sd-webui-lora-train] installed peft==0.13.2; nothing else changed\n"


def test_imagehash_goes_in_alone_beside_a_webui_venvs_scipy_and_pywavelets(monkeypatch, capsys) -> None:
    """A fresh WebUI venv has ImageHash's numpy, scipy, Pillow and PyWavelets but not ImageHash: its wheel goes in
    with --no-deps, the resolver never runs, nothing installed changes."""
    without = {**{name: version for name, version in WEBUI.items() if name != "imagehash"}, "peft": "0.13.2"}
    venv = FakeVenv(monkeypatch, without, adds={}, index={"ImageHash": ("4.3.2", IMAGEHASH_REQUIRES)})
    assert venv.install.main([]) == 0
    assert venv.resolver_calls == [] and venv.no_deps_installs == [["ImageHash==4.3.2"]]
    assert {n: v for n, v in venv.installed.items() if n != "imagehash"} == without
    assert capsys.readouterr().out == "[sd-webui-lora-train] installed imagehash==4.3.2; nothing else changed\n"


def test_constraint_lines_take_odd_entries() -> None:
    install = _load()
    installed = {"torch": "2.1.2+cu121", "clip": "1.0", "legacy-thing": "2022-01-beta", "zope-interface": "7.2"}
    lines = install.constraint_lines(installed)
    for line in lines:  # each line parses the way pip parses it and admits exactly the installed version
        requirement = Requirement(line)
        assert requirement.specifier.contains(installed[requirement.name], prereleases=True), line
    assert "legacy-thing===2022-01-beta" in lines


def test_distributions_are_read_by_canonical_name_first_copy_wins(monkeypatch) -> None:
    install = _load()
    dists = [SimpleNamespace(metadata={"Name": n}, version=v) for n, v in
             [("Typing_Extensions", "4.16.0"), ("PyYAML", "6.0.4"), ("typing-extensions", "4.0.0"), (None, "1")]]
    monkeypatch.setattr(install.importlib.metadata, "distributions", lambda: iter(dists))
    assert install.installed_distributions() == {"typing-extensions": "4.16.0", "pyyaml": "6.0.4"}


def test_nothing_missing_runs_no_pip_and_no_subprocess(monkeypatch, capsys) -> None:
    venv = FakeVenv(monkeypatch, {**WEBUI, "peft": "0.13.2"}, adds={})

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a no-op install must not start {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert venv.install.main([]) == 0
    assert venv.pip_calls == []
    assert capsys.readouterr().out == "[sd-webui-lora-train] requirements present; nothing to install\n"


def test_a_bare_venv_gets_what_is_missing_and_nothing_optional(monkeypatch) -> None:
    venv = FakeVenv(monkeypatch, {"torch": "2.13.0"}, adds={"numpy": "2.0", "packaging": "25.0", "psutil": "7.0",
                                                              "transformers": "4.46", "accelerate": "1.0",
                                                              "huggingface-hub": "0.26"})
    venv.install.main([])
    download = venv.pip_calls[0][0]
    for name in ("peft==0.13.2", "ImageHash==4.3.2", "safetensors", "PyYAML", "tqdm", "open-clip-torch"):
        assert f'"{name}"' in download
    # the resolver only for what none of those wheels provides; the wheels themselves as they are
    (resolved,) = venv.resolver_calls
    assert sorted(resolved) == sorted(["numpy>=1.17", "packaging>=20.0", "psutil", "transformers",
                                       "accelerate>=0.21.0", "huggingface-hub>=0.17.0"])
    assert len(venv.no_deps_installs[0]) == 6
    assert not any("tensorboard" in c or "bitsandbytes" in c for c, _ in venv.pip_calls)


def test_an_inconsistent_venv_still_gets_peft_when_all_it_needs_is_there(monkeypatch, capsys) -> None:
    """reForge's venv: pip check says torch wants setuptools>=77 (69.5.1 is installed), so the resolver refuses
    anything that touches torch. peft's needs are all met, so its wheel goes in alone and the tab loads."""
    venv = FakeVenv(monkeypatch, {**WEBUI, "torch": "2.14.1", "setuptools": "69.5.1"}, adds={},
                    pip_output=INCONSISTENT)
    assert venv.install.main([]) == 0
    assert venv.resolver_calls == [] and venv.installed["peft"] == "0.13.2"
    assert capsys.readouterr().out == "[sd-webui-lora-train] installed peft==0.13.2; nothing else changed\n"


def test_only_what_is_really_missing_goes_through_the_resolver(monkeypatch, capsys) -> None:
    """psutil missing: the resolver adds psutil alone (which touches nothing else), then peft goes in alone."""
    without = {k: v for k, v in WEBUI.items() if k != "psutil"}
    venv = FakeVenv(monkeypatch, {**without, "torch": "2.14.1", "setuptools": "69.5.1"}, adds={"psutil": "7.0.0"},
                    pip_output=INCONSISTENT, refuses=("torch", "peft==0.13.2"))
    assert venv.install.main([]) == 0
    assert venv.resolver_calls == [["psutil"]] and venv.no_deps_installs == [["peft==0.13.2"]]
    assert capsys.readouterr().out == \
        "[sd-webui-lora-train] installed peft==0.13.2, psutil==7.0.0; nothing else changed\n"


def test_a_dependency_at_a_version_peft_refuses_is_named_and_nothing_changes(monkeypatch, capsys) -> None:
    venv = FakeVenv(monkeypatch, {**WEBUI, "accelerate": "0.20.3"}, adds={})
    assert venv.install.main([]) == 1
    assert [c for c, _ in venv.pip_calls if not c.startswith("download")] == [] and venv.installed == \
        {**WEBUI, "accelerate": "0.20.3"}
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "ERROR: peft 0.13.2 needs accelerate>=0.21.0 (0.20.3 is installed), and install.py never changes" in out


def test_import_failure_after_install_removes_what_was_added(monkeypatch, capsys) -> None:
    without = {k: v for k, v in WEBUI.items() if k != "accelerate"}
    venv = FakeVenv(monkeypatch, without, adds={"accelerate": "0.21.0"})
    error = "ImportError: cannot import name 'is_torch_xpu_available' from 'transformers'"
    monkeypatch.setattr(venv.install, "import_failure", lambda: ("transformers", error))
    assert venv.install.main([]) == 1
    assert sorted(venv.uninstalled) == ["accelerate", "peft"] and venv.installed == without
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "ERROR: with peft==0.13.2 added the extension does not import (transformers: ImportError" in out
    assert "removed again what was added (accelerate, peft)" in out


def test_pip_refusal_is_one_line_with_pips_reason(monkeypatch, capsys) -> None:
    output = "Collecting psutil\nERROR: Cannot install psutil because these package versions have " \
             "conflicting dependencies.\nERROR: ResolutionImpossible: for help visit https://pip.pypa.io"
    without = {k: v for k, v in WEBUI.items() if k != "psutil"}
    venv = FakeVenv(monkeypatch, without, adds={}, pip_output=output)
    assert venv.install.main([]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "nothing was added" in out
    assert "pip could not add psutil (needed by peft==0.13.2) without changing installed packages: Cannot " \
           "install psutil because these package versions" in out
    assert venv.installed == without and venv.no_deps_installs == []


def test_without_a_wheel_to_read_pip_resolves_it_all_as_before(monkeypatch, capsys) -> None:
    venv = FakeVenv(monkeypatch, WEBUI, adds={"peft": "0.13.2"})
    monkeypatch.setattr(venv.install, "fetch_wheels", lambda requirements, folder: None)  # offline index, sdist
    assert venv.install.main([]) == 0
    assert venv.resolver_calls == [["peft==0.13.2"]]


def test_import_check_names_the_package_that_fails(tmp_path, monkeypatch, capsys) -> None:
    install = _load()
    (tmp_path / "needs_missing.py").write_text("import surely_not_installed_pkg\n")
    (tmp_path / "needs_newer.py").write_text("from json import symbol_of_a_newer_json\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert install.check_imports(str(tmp_path), ["json", "needs_missing"]) == 1
    assert capsys.readouterr().out.startswith("surely_not_installed_pkg|ModuleNotFoundError")
    assert install.check_imports(str(tmp_path), ["needs_newer"]) == 1
    assert capsys.readouterr().out.startswith("json|ImportError: cannot import name 'symbol_of_a_newer_json'")
    assert install.check_imports(str(tmp_path), ["json"]) == 0


def test_host_profile_is_the_freeze_with_cpu_torch_and_overrides(tmp_path) -> None:
    host_freeze = _load(ROOT / "tools" / "host_freeze.py")
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# header\nhuggingface_hub==0.36.2\ntorch==2.14.1\nnvidia-cublas==13.1.1.3\ntriton==3.8.0\n"
                      "cuda-bindings==13.5.0\ntorchvision==0.29.1\nspandrel_extra_arches==0.1.1\n")
    lines = host_freeze.requirement_lines(host_freeze.read_pins(freeze, ["huggingface-hub==0.23.4"]))
    assert lines == ["huggingface_hub==0.23.4", "spandrel_extra_arches==0.1.1", host_freeze.SETUPTOOLS, "torch==2.13.0"]
    with pytest.raises(SystemExit, match="--set numpy==1.0: give NAME==VERSION for a package of"):
        host_freeze.read_pins(freeze, ["numpy==1.0"])
    freeze.write_text("peft @ git+https://example.invalid/peft\n")
    with pytest.raises(SystemExit, match=r"freeze.txt:1: .* is not a 'name==version' line"):
        host_freeze.read_pins(freeze, [])


def test_host_check_names_each_changed_pin(tmp_path, monkeypatch) -> None:
    host_freeze = _load(ROOT / "tools" / "host_freeze.py")
    installed = {"protobuf": "7.34.0", "transformers": "4.30.2", "torch": "2.13.0+cpu"}

    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(host_freeze.importlib.metadata, "version", version)
    pins = {"protobuf": ("protobuf", "3.20.0"), "transformers": ("transformers", "4.30.2"),
            "torch": ("torch", "2.14.1"), "gradio": ("gradio", "3.41.2")}
    assert host_freeze.changed(pins) == ["protobuf: 3.20.0 -> 7.34.0", "gradio: 3.41.2 -> missing"]


def test_the_tab_loads_in_this_venv_without_diffusers() -> None:
    """What install.py leaves is enough: the glue loads over WebUI stand-ins with diffusers blocked."""
    pytest.importorskip("ldm", reason="the WebUI stand-ins (tests/test_api.py) need stable-diffusion-sdkit")
    pytest.importorskip("gradio")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "webui_import_check.py")], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "lora_train_tab.py loads without diffusers" in run.stdout.splitlines()[-1]


def _freeze(python: Path) -> set[str]:
    """``pip freeze`` (which, unlike ``pip list``, shows a package installed from a file as ``name @ file://``)."""
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return {line.strip().lower() for line in out.splitlines() if line.strip()}


@pytest.fixture
def venv_without_peft(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A throwaway venv seeing this interpreter's packages (symlinked, nothing copied) except peft; its python."""
    source = Path(sysconfig.get_paths()["purelib"])
    if not (source / "pip").is_dir():
        pytest.skip("this interpreter's site-packages has no pip")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    for entry in source.iterdir():
        if entry.name != "peft" and not entry.name.lower().startswith("peft-"):
            (target / entry.name).symlink_to(entry)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    return python, env


@pytest.mark.slow
def test_real_install_twice_installs_peft_once_and_nothing_else(venv_without_peft, tmp_path: Path) -> None:
    python, env = venv_without_peft
    before = _freeze(python)
    assert not any(line.startswith("peft==") for line in before)

    first = subprocess.run([str(python), str(INSTALL)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout == "[sd-webui-lora-train] installed peft==0.13.2; nothing else changed\n"
    after = _freeze(python)
    assert after - before == {"peft==0.13.2"} and before - after == set()

    second = subprocess.run([str(python), str(INSTALL)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert second.returncode == 0
    assert second.stdout == "[sd-webui-lora-train] requirements present; nothing to install\n"
    assert _freeze(python) == after


@pytest.mark.slow
def test_real_install_on_a_venv_pip_calls_inconsistent_adds_peft_alone(venv_without_peft, tmp_path: Path) -> None:
    """As in the reForge build, torch declares a setuptools the venv does not have (here: >=999): `pip check`
    complains and pip's resolver refuses anything that touches torch. peft's needs are all there, so it goes in."""
    python, env = venv_without_peft
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (torch_info,) = purelib.glob("torch-*.dist-info")
    source = torch_info.resolve()
    torch_info.unlink()
    shutil.copytree(source, torch_info)  # our own copy of torch's metadata, the rest stays a symlink
    metadata = torch_info / "METADATA"
    text = metadata.read_text(encoding="utf-8")
    metadata.write_text(text.replace("Requires-Dist:", "Requires-Dist: setuptools>=999\nRequires-Dist:", 1),
                        encoding="utf-8")
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, env=env)
    assert "has requirement setuptools>=999" in check.stdout, check.stdout
    before = _freeze(python)

    run = subprocess.run([str(python), str(INSTALL)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == "[sd-webui-lora-train] installed peft==0.13.2; nothing else changed\n"
    assert _freeze(python) - before == {"peft==0.13.2"} and before - _freeze(python) == set()


@pytest.mark.slow
def test_real_install_that_breaks_the_import_is_undone(venv_without_peft, tmp_path: Path) -> None:
    """peft 0.14 installs under the pins (its metadata allows transformers 4.30) but does not import there."""
    python, env = venv_without_peft
    if Version(importlib.metadata.version("transformers")) >= Version("4.34"):  # the venv sees our packages
        pytest.skip("peft 0.14 imports with this transformers")
    extension = tmp_path / "extension"
    extension.mkdir()
    (extension / "install.py").write_text(INSTALL.read_text().replace("peft==0.13.2", "peft==0.14.0"))
    (extension / "lora_train").symlink_to(ROOT / "lora_train")
    before = _freeze(python)

    run = subprocess.run([str(python), str(extension / "install.py")], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 1 and run.stdout.count("\n") == 1
    assert _freeze(python) == before
    if "pip could not add peft==0.14.0" in run.stdout:  # e.g. huggingface_hub < 0.25: refused, nothing added
        pytest.skip(f"peft 0.14 does not resolve under this venv's pins: {run.stdout}")
    assert "extension does not import (transformers: ImportError" in run.stdout
    assert "removed again what was added (peft)" in run.stdout
