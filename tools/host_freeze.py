"""The WebUI host profile as pip sees it: requirement lines from a freeze of a real WebUI venv, and a check.

CI builds its venvs from ``requirements/webui-1.10.1-freeze.txt`` (a ``pip freeze`` of a fresh A1111 v1.10.1
venv) so the tests meet what a user's install.py meets, not a profile of our own. torch, torchvision, triton
and the CUDA wheels cannot be installed as frozen on a CPU machine: torch becomes the CPU build ``torch==2.13.0``
and torchvision is installed separately (see tools/setup_venv.sh).

    python tools/host_freeze.py requirements FREEZE [--set NAME==VERSION ...]   # pip lines, one a line
    python tools/host_freeze.py check FREEZE [--set NAME==VERSION ...]          # exit 1 if a pin changed

``--set`` replaces one pin (an older venv: ``--set huggingface_hub==0.23.4``). ``check`` looks at the
interpreter that runs it, so run it with the venv's python. The requirement lines double as the constraints
under which the CLI's and the tests' packages are added.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from install import canonical  # noqa: E402 - install.py is the extension's entry point, not a package

CPU_TORCH = "torch==2.13.0"
# pip freeze leaves setuptools out; the WebUI venv had 80.9.0 (its header says so), and pytorch_lightning 1.9
# needs the pkg_resources that setuptools 81 removed
SETUPTOOLS = "setuptools==80.9.0"
# the machine-specific builds that are replaced (torch) or installed apart (torchvision)
NOT_AS_FROZEN = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def read_pins(freeze: Path, overrides: list[str]) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version) for every ``name==version`` line of the freeze."""
    pins: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(freeze.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{freeze}:{number}: {raw!r} is not a 'name==version' line; re-create it with pip freeze")
        pins[canonical(name)] = (name.strip(), version.strip())
    for item in overrides:
        name, sep, version = item.partition("==")
        if not sep or canonical(name) not in pins:
            raise SystemExit(f"--set {item}: give NAME==VERSION for a package of {freeze}")
        pins[canonical(name)] = (pins[canonical(name)][0], version.strip())
    return pins


def requirement_lines(pins: dict[str, tuple[str, str]]) -> list[str]:
    kept = [f"{name}=={version}" for key, (name, version) in pins.items() if not NOT_AS_FROZEN.match(key)]
    return [*kept, SETUPTOOLS, CPU_TORCH]


def changed(pins: dict[str, tuple[str, str]]) -> list[str]:
    """``name: frozen -> installed`` for each pin (CPU-build exceptions aside) the running venv does not match."""
    out = []
    for key, (name, version) in pins.items():
        if NOT_AS_FROZEN.match(key):
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            out.append(f"{name}: {version} -> {installed}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("requirements", "check"))
    parser.add_argument("freeze", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME==VERSION")
    args = parser.parse_args(argv)
    pins = read_pins(args.freeze, args.overrides)
    if args.command == "requirements":
        print("\n".join(requirement_lines(pins)))
        return 0
    differences = changed(pins)
    if differences:
        print(f"host_freeze: {len(differences)} package(s) of {args.freeze} changed: {'; '.join(differences)}")
        return 1
    print(f"host_freeze: all {len(pins)} pins of {args.freeze} as frozen (torch/CUDA builds aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
