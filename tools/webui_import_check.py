"""Load scripts/lora_train_tab.py the way the WebUI does, in a venv built like the WebUI's, with diffusers blocked.

The WebUI's venv has no diffusers, so the tab must load without it: this imports the glue over the stand-in
``modules`` of tests/test_api.py (no model loaded), builds the tab with the venv's real gradio, registers the
settings and the REST routes, and fails if anything reached for diffusers. Run it with the venv's python:

    .venv-older/bin/python tools/webui_import_check.py
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GLUE = ROOT / "scripts" / "lora_train_tab.py"


def main() -> int:
    sys.modules["diffusers"] = None  # type: ignore[assignment] - any `import diffusers` now raises ImportError
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from fastapi import FastAPI
    from test_api import _namespace  # the WebUI stand-ins the API tests use

    with tempfile.TemporaryDirectory() as tmp:
        ns = _namespace(Path(tmp), model=None)
        sys.modules["modules"] = ns.modules
        for name, value in ns.parts.items():
            sys.modules[f"modules.{name}"] = value
        sys.modules["networks"] = ns.networks
        spec = importlib.util.spec_from_file_location("lora_train_tab", GLUE)
        glue = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(glue)
        for callback in ns.callbacks["ui_settings"]:
            callback()
        tabs = [tab for callback in ns.callbacks["ui_tabs"] for tab in callback()]
        app = FastAPI()
        for callback in ns.callbacks["app_started"]:
            callback(None, app)
    routes = [route.path for route in app.routes if "/lora-train/" in getattr(route, "path", "")]
    problems = [what for what, bad in [("no LoRA Train tab", [t[1] for t in tabs] != ["LoRA Train"]),
                                       ("no settings", not ns.options), ("no REST routes", not routes)] if bad]
    if problems:
        print(f"webui_import_check: {GLUE.name} loaded but gave {', '.join(problems)}")
        return 1
    import gradio

    print(f"webui_import_check: {GLUE.name} loads without diffusers (gradio {gradio.__version__}): the tab, "
          f"{len(ns.options)} settings, {len(routes)} REST routes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
