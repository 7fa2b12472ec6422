"""Install what sd-webui-lora-train needs and the WebUI lacks; the WebUI runs this at every launch.

Only missing packages are installed, at the newest versions that import in the WebUI's venv (peft 0.13.2:
later ones need a newer transformers; diffusers 0.26.3: later ones need peft's backend for LoRA loading).
torch, transformers, gradio, numpy and Pillow are pinned to what is installed (a pip constraint), so pip can
never upgrade or downgrade them. When everything is there it is a fast no-op: metadata look-ups, no pip.
Inside the WebUI it uses ``launch.run_pip``; elsewhere ``python -m pip``. Prints one line on what it did.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile

# package -> version to install when it is missing
REQUIRED = {"peft": "0.13.2", "diffusers": "0.26.3"}
# present in the WebUI already; installed (unpinned) only when missing, e.g. in a bare venv
OPTIONAL = {"safetensors": "", "open-clip-torch": "", "PyYAML": "", "tqdm": "", "tensorboard": ""}
NEVER_CHANGE = ("torch", "transformers", "gradio", "numpy", "Pillow")
PREFIX = "[sd-webui-lora-train]"


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements() -> list[str]:
    """pip requirement strings for every package that is not installed."""
    wanted = {**OPTIONAL, **REQUIRED}
    return [f"{name}=={version}" if version else name for name, version in wanted.items()
            if installed_version(name) is None]


def constraints_text() -> str:
    """``name==installed`` for each package we must never change (skipping ones not installed)."""
    lines = []
    for name in NEVER_CHANGE:
        version = installed_version(name)
        if version:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def _webui_launch():
    """A1111's ``launch`` module when we run as its extension installer, else None."""
    try:
        import launch
    except Exception:  # noqa: BLE001 - outside the WebUI there is no (usable) launch module
        return None
    return launch if hasattr(launch, "run_pip") and hasattr(launch, "is_installed") else None


def pip_install(requirements: list[str], constraints: str) -> None:
    """Install with the WebUI's pip runner when there is one, else ``python -m pip``."""
    handle, path = tempfile.mkstemp(prefix="lora-train-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(constraints)
        launch = _webui_launch()
        if launch is not None:
            args = " ".join(f'"{r}"' for r in requirements)
            launch.run_pip(f'install {args} -c "{path}"', f"sd-webui-lora-train: {', '.join(requirements)}")
        else:
            subprocess.run([sys.executable, "-m", "pip", "install", *requirements, "-c", path], check=True)
    finally:
        os.unlink(path)


def main() -> int:
    requirements = missing_requirements()
    if not requirements:
        print(f"{PREFIX} requirements present; nothing to install")
        return 0
    before = {name: installed_version(name) for name in NEVER_CHANGE}
    pip_install(requirements, constraints_text())
    changed = [n for n in NEVER_CHANGE if installed_version(n) != before[n]]
    outcome = f"WARNING: {', '.join(changed)} changed" if changed else "no host package changed"
    print(f"{PREFIX} installed {', '.join(requirements)}; {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
