"""Install what sd-webui-lora-train needs and the WebUI's venv lacks; the WebUI runs this at every launch.

It never changes a package that is installed, any package: pip runs with every installed distribution pinned
to its installed version (a constraint file), so it can only add what is missing. A newer tensorboard once
pulled protobuf 7 into a WebUI venv and the WebUI never started again; nothing optional is installed here.
The WebUI path needs peft on top of the WebUI's venv (0.13.2: later ones need a newer transformers) and
ImageHash for the dataset check's near duplicates (its numpy, scipy, Pillow and PyWavelets are in every WebUI
venv, so it goes in alone); the rest is installed only when missing, which in a WebUI venv it never is. After
installing, the engine modules the WebUI loads are imported in a fresh interpreter; if they fail, what was just
added is uninstalled again.
When nothing is missing it is a fast no-op: metadata look-ups, no pip. Prints one line.

Users' venvs are often inconsistent already (an extension pinned something; `pip check` complains), and pip's
resolver then refuses any install that touches the complaining package, even where the new one needs nothing
changed. So the resolver is used only for what is really missing: each requirement's wheel is fetched without
its dependencies, its declared dependencies are compared with what is installed (``importlib.metadata`` and
``packaging``), and when all are there at versions it accepts, the wheel goes in with ``--no-deps``.
"""

from __future__ import annotations

import contextlib
import email.parser
import importlib
import importlib.metadata
import io
import re
import subprocess
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare venv: pip always carries its own copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

PREFIX = "[sd-webui-lora-train]"
EXTENSION_DIR = Path(__file__).resolve().parent
# distribution -> requirement to install when it is missing
REQUIRED = {"peft": "peft==0.13.2", "ImageHash": "ImageHash==4.3.2"}
# part of every WebUI venv; installed (at what pip picks under the constraints) only when missing
IF_MISSING = ("safetensors", "PyYAML", "tqdm", "open-clip-torch")
# what scripts/lora_train_tab.py loads in the WebUI; must import after installing
WEBUI_MODULES = ("lora_train.webui.a1111", "lora_train.webui.jobs", "lora_train.webui.api",
                 "lora_train.engine.network.lora", "lora_train.engine.train.trainer")
CHECK_FLAG = "--check-imports"


def canonical(name: str) -> str:
    """PEP 503 name: ``Foo_Bar`` and ``foo-bar`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, str]:
    """canonical name -> installed version; where a venv holds two copies, the one Python imports (first)."""
    importlib.invalidate_caches()  # pip may just have added some
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version:
            found.setdefault(canonical(name), version)
    return found


def constraint_lines(installed: dict[str, str]) -> list[str]:
    """One pip constraint per installed distribution, pinning it to exactly what is there.

    ``==`` takes local versions (``2.1.2+cu121``) and packages installed from a URL (pip matches the installed
    one); a version that is not PEP 440 gets ``===``, pip's exact string match, instead of breaking the file.
    """
    lines = []
    for name, version in sorted(installed.items()):
        try:
            Version(version)
            lines.append(f"{name}=={version}")
        except InvalidVersion:
            lines.append(f"{name}==={version}")
    return lines


def missing_requirements(installed: dict[str, str]) -> list[str]:
    wanted = {**{name: name for name in IF_MISSING}, **REQUIRED}
    return [requirement for name, requirement in wanted.items() if canonical(name) not in installed]


def _webui_launch():
    """A1111's ``launch`` module when we run as its extension installer (PYTHONPATH is the WebUI), else None."""
    try:
        import launch
    except Exception:  # noqa: BLE001 - outside the WebUI there is no (usable) launch module
        return None
    return launch if hasattr(launch, "run_pip") else None


def _pip_error(output: str) -> str:
    """pip's own one-line reason (its first ``ERROR:`` line: the later ones point to docs), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = errors[0] if errors else (lines or ["pip failed"])[-1]
    return reason.removeprefix("ERROR:").strip().rstrip(".")


def pip_install(args: list[str], desc: str, verb: str = "install") -> str | None:
    """``pip install`` (or ``verb``) through the WebUI's runner when there is one (it honours INDEX_URL and
    --skip-install); None on success, else pip's reason in one line."""
    launch = _webui_launch()
    if launch is None:
        return python_pip([verb, *args])
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its "Installing ..." line: ours is the one line
            launch.run_pip(f"{verb} " + " ".join(f'"{a}"' for a in args), f"sd-webui-lora-train: {desc}")
    except Exception as exc:  # noqa: BLE001 - run_pip raises RuntimeError carrying pip's output
        return _pip_error(str(exc))
    return None


def python_pip(args: list[str]) -> str | None:
    """``python -m pip`` with this interpreter; None on success, else pip's reason in one line."""
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else _pip_error(done.stdout + done.stderr)


def check_imports(extension_dir: str, modules: list[str]) -> int:
    """Child side of :func:`import_failure`: import ``modules``; on failure print ``distribution|error``."""
    sys.path.insert(0, extension_dir)
    try:
        for name in modules:
            importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import is what we report
        print(f"{_culprit(exc)}|{type(exc).__name__}: {exc}".splitlines()[0])
        return 1
    return 0


def _culprit(exc: BaseException) -> str:
    """The distribution an import failure comes from: the module it names, else the deepest installed frame."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    if not top:
        frames = [f.filename.replace("\\", "/") for f in traceback.extract_tb(exc.__traceback__)]
        installed = [f.split("-packages/", 1)[1] for f in frames if "-packages/" in f]
        top = installed[-1].split("/")[0].removesuffix(".py") if installed else ""
    return (importlib.metadata.packages_distributions().get(top) or [top or "an unknown package"])[0]


def import_failure() -> tuple[str, str] | None:
    """None when the WebUI path's modules import in a fresh interpreter, else (distribution, error)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHECK_FLAG, *WEBUI_MODULES],
                          capture_output=True, text=True, cwd=EXTENSION_DIR)
    if done.returncode == 0:
        return None
    lines = (done.stdout.strip() or f"an unknown package|{done.stderr.strip()}").splitlines()
    package, _, detail = lines[-1].partition("|")
    return package, detail


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) from a wheel's ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(archive.read(member).decode("utf-8"))
    return meta["Name"], meta["Version"], meta.get_all("Requires-Dist") or []


def _accepts(requirement: Requirement, version: str) -> bool:
    try:
        return requirement.specifier.contains(version, prereleases=True)
    except InvalidVersion:  # a version that is not PEP 440: no specifier can be checked against it
        return not str(requirement.specifier)


def unmet_dependencies(wheels: list[Path], installed: dict[str, str]) -> tuple[list[str], list[str]]:
    """What the wheels declare that the venv (with the wheels added) lacks: (missing requirements, conflicts).

    A conflict is a dependency installed at a version the wheel does not accept ("accelerate>=0.21.0 (0.20.0 is
    installed)"); install.py never changes an installed package, so nothing can fix it here.
    """
    metas = [wheel_metadata(wheel) for wheel in wheels]
    available = {**installed, **{canonical(name): version for name, version, _ in metas}}
    missing: list[str] = []
    conflicts: list[str] = []
    for name, version, requires in metas:
        for line in requires:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                missing.append(line)  # let pip read it
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an optional extra, or another platform's
            have = available.get(canonical(requirement.name))
            if have is None or requirement.extras:
                missing.append(str(requirement))
            elif not _accepts(requirement, have):
                conflicts.append(f"{name} {version} needs {requirement} ({have} is installed)")
    return list(dict.fromkeys(missing)), conflicts


def fetch_wheels(requirements: list[str], folder: Path) -> list[Path] | None:
    """The wheels of ``requirements`` alone (no dependencies), downloaded into ``folder``; None when pip cannot."""
    if pip_install(["--no-deps", "--only-binary=:all:", "-d", str(folder), *requirements], ", ".join(requirements),
                   verb="download") is not None:
        return None
    wheels = sorted(folder.glob("*.whl"))
    return wheels if len(wheels) == len(requirements) else None


def add(requirements: list[str], constraints: Path, before: dict[str, str], folder: Path) -> str | None:
    """Install ``requirements`` without changing anything in ``before``; None, or what went wrong in one line.

    Where each requirement's dependencies are all installed at versions it accepts, its wheel goes in with
    ``--no-deps``: pip's resolver would also check the installed packages' own requirements, and refuse because
    of a conflict the venv already had. Dependencies that are missing go in first with the resolver (everything
    installed pinned). When the wheels cannot be fetched alone, the resolver does all of it, as it would anyway.
    """
    wanted = ", ".join(requirements)
    wheels = fetch_wheels(requirements, folder)
    if wheels is None:
        error = pip_install([*requirements, "-c", str(constraints)], wanted)
        return f"pip could not add {wanted} without changing installed packages: {error}" if error else None
    missing, conflicts = unmet_dependencies(wheels, before)
    if conflicts:
        return f"{'; '.join(conflicts)}, and install.py never changes an installed package"
    if missing and (error := pip_install([*missing, "-c", str(constraints)], ", ".join(missing))):
        return f"pip could not add {', '.join(missing)} (needed by {wanted}) without changing installed " \
            f"packages: {error}"
    # by name from the folder, not by file: a wheel installed by path is recorded as a URL install (`pip freeze`
    # would show "peft @ file:///tmp/...")
    error = pip_install(["--no-deps", "--no-index", "--find-links", str(folder), *requirements, "-c",
                         str(constraints)], wanted)
    return f"pip could not add {wanted}: {error}" if error else None


def install(requirements: list[str], before: dict[str, str]) -> tuple[bool, str]:
    """Install ``requirements`` with everything in ``before`` pinned; undo it if anything went wrong."""
    with tempfile.TemporaryDirectory(prefix="lora-train-install-") as work:
        constraints = Path(work) / "constraints.txt"
        constraints.write_text("\n".join(constraint_lines(before)) + "\n", encoding="utf-8")
        (Path(work) / "wheels").mkdir()
        problem = add(requirements, constraints, before, Path(work) / "wheels")
    if problem is None and (broken := import_failure()) is not None:
        problem = f"with {', '.join(requirements)} added the extension does not import ({broken[0]}: {broken[1]})"
    after = installed_distributions()
    added = sorted(set(after) - set(before))
    changed = [f"{name} {before[name]} -> {after.get(name, 'removed')}" for name in sorted(before)
               if after.get(name) != before[name]]
    if problem is None and not changed:
        return True, f"{PREFIX} installed {', '.join(f'{n}=={after[n]}' for n in added)}; nothing else changed"
    problem = problem or f"pip changed {', '.join(changed)}"
    if not added:
        outcome = "nothing was added"
    elif python_pip(["uninstall", "-y", *added]) is None:
        outcome = f"removed again what was added ({', '.join(added)})"
    else:
        outcome = f"could not remove {', '.join(added)} again: pip uninstall {' '.join(added)}"
    return False, f"{PREFIX} ERROR: {problem}; {outcome}. The LoRA Train tab cannot load until this is fixed."


def main(argv: list[str]) -> int:
    if argv[:1] == [CHECK_FLAG]:
        return check_imports(str(EXTENSION_DIR), argv[1:])
    before = installed_distributions()
    requirements = missing_requirements(before)
    if not requirements:
        print(f"{PREFIX} requirements present; nothing to install")
        return 0
    ok, line = install(requirements, before)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
