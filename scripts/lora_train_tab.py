"""A1111 glue for sd-webui-lora-train: the LoRA Train tab, its settings and its REST routes.

The only file that imports the WebUI's ``modules``; everything else lives in the host-agnostic ``lora_train``
package, which gets the WebUI's objects (shared, queue lock, Lora extension) handed in.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import gradio as gr
from modules import call_queue, script_callbacks, shared

EXTENSION_DIR = Path(__file__).resolve().parent.parent
if str(EXTENSION_DIR) not in sys.path:
    sys.path.insert(0, str(EXTENSION_DIR))

from lora_train.webui.a1111 import WebUIHost, persistent_runner, txt2img_sampler  # noqa: E402
from lora_train.webui.api import build_router, parse_credentials, path_refusal  # noqa: E402
from lora_train.webui.jobs import JobRunner  # noqa: E402
from lora_train.webui.paths import PathPolicy, is_inside, resolve  # noqa: E402
from lora_train.webui.presets import DEFAULT_PRESET, PRESET_NAMES  # noqa: E402

SECTION = ("lora_train", "LoRA Train")
CATEGORY = "training"  # the WebUI's own "Training" settings category (v1.7+)


def _opt(key: str, default: str = "") -> str:
    return str(getattr(shared.opts, key, default) or default)


def lora_dir() -> Path:
    """The WebUI's Lora folder (``--lora-dir`` honoured)."""
    configured = getattr(shared.cmd_opts, "lora_dir", None)
    if configured:
        return resolve(configured)
    from modules import paths

    return resolve(os.path.join(paths.models_path, "Lora"))


def data_dir() -> Path:
    return resolve(getattr(shared.cmd_opts, "data_dir", None) or os.getcwd())


def output_dir() -> Path:
    """The output folder from Settings when it lies inside the Lora folder, else the Lora folder itself."""
    base = lora_dir()
    chosen = _opt("lora_train_output_dir").strip()
    if chosen and is_inside(chosen, base):
        return resolve(chosen)
    if chosen:
        print(f"[lora-train] output folder {chosen} is outside {base}; using {base}", file=sys.stderr)
    return base


def run_dir() -> Path:
    """Where runs keep state, step checkpoints and samples: never inside the Lora folder, whose every
    .safetensors/.pt the WebUI lists as a card."""
    default = data_dir() / "outputs" / "lora-train"
    chosen = _opt("lora_train_run_dir").strip()
    if chosen and is_inside(chosen, lora_dir()):
        print(f"[lora-train] run folder {chosen} is inside the Lora folder; using {default}", file=sys.stderr)
        return default
    return resolve(chosen) if chosen else default


def policy() -> PathPolicy:
    extra = [p.strip() for p in _opt("lora_train_allowed_dirs").replace(";", "\n").splitlines() if p.strip()]
    rules = PathPolicy.for_webui(data_dir(), lora_dir(), run_dir(), extra)
    rules.output_root = output_dir()
    return rules


def _networks():
    """The built-in Lora extension's ``networks`` module, when it is enabled."""
    try:
        import networks
    except ImportError:
        return None
    return networks if hasattr(networks, "list_available_networks") else None


def _model_management():
    """Forge's model manager: ``ldm_patched`` on reForge / Forge Classic, ``backend`` on Forge 2 / Neo (else None)."""
    try:
        from ldm_patched.modules import model_management
    except ImportError:
        try:
            from backend import memory_management as model_management
        except ImportError:
            return None
    return model_management


def _reload_model():
    """Forge 2 / Neo load the checkpoint the dropdown names only when something generates (``forge_model_reload``,
    a no-op when it is loaded); None on the WebUIs that load it at once."""
    try:
        from modules import sd_models
    except ImportError:
        return None
    return getattr(sd_models, "forge_model_reload", None)


def _sampler(cfg, log):
    from modules import processing

    return txt2img_sampler(processing, shared, cfg, log)


def _processing():
    from modules import processing

    return processing


def _full_host_check() -> bool:
    return bool(getattr(shared.opts, "lora_train_full_host_check", False))


# "Reload UI" runs this file again; the runner (and a job it is running) lives on in the engine package
RUNNER = persistent_runner(shared, lambda: JobRunner(
    WebUIHost(shared, call_queue.queue_lock, _networks, _sampler, _full_host_check, _model_management,
              _reload_model(), _processing), policy))


def _install_package(name: str) -> str | None:
    """Add ``name`` with install.py's constrained pip (nothing installed changes); None when it worked."""
    spec = importlib.util.spec_from_file_location("lora_train_install", EXTENSION_DIR / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    ok, line = install.install([name], install.installed_distributions())
    return None if ok else line


def _caption_sources():
    """The WebUI's interrogators (BLIP, DeepBooru) and the captioner settings, read at each click.

    Forge Classic removed both (no ``modules.deepbooru``, ``shared.interrogator`` stays None): offered where present.
    """
    from modules import paths

    from lora_train.caption.choices import CaptionSources

    try:
        from modules import deepbooru
    except ImportError:
        deepbooru = None
    return CaptionSources(
        interrogator=getattr(shared, "interrogator", None),
        deepbooru=getattr(deepbooru, "model", None),
        coca_weights=_opt("lora_train_captioner_weights") or None,
        models_dir=Path(paths.models_path) / "lora_train_captioners",
        allow_download=bool(getattr(shared.opts, "lora_train_allow_downloads", True)),
        install=_install_package,
    )


def on_ui_tabs():
    from lora_train.webui.ui import UISettings, build_ui

    settings = UISettings(
        datasets_root=data_dir() / "lora_train_datasets",
        captioner_weights=_opt("lora_train_captioner_weights") or None,
        default_preset=_opt("lora_train_default_preset", DEFAULT_PRESET),
        caption_sources=_caption_sources,
    )
    return [(build_ui(RUNNER, settings), "LoRA Train", "lora_train")]


def on_ui_settings():
    def add(key: str, default, label: str, component=None, args=None):
        info = shared.OptionInfo(default, label, component, args, section=SECTION)
        info.category_id = CATEGORY  # older WebUIs ignore it; OptionInfo only takes it as an argument since 1.7
        shared.opts.add_option(key, info)

    add("lora_train_output_dir", "", "Output folder (blank: the WebUI's Lora folder; must lie inside it)")
    add("lora_train_run_dir", "", "Run folder for resumable state, step checkpoints and samples (blank: "
        "outputs/lora-train; never inside the Lora folder)")
    add("lora_train_default_preset", DEFAULT_PRESET, "Default preset", gr.Dropdown, {"choices": list(PRESET_NAMES)})
    add("lora_train_captioner_weights", "", "Captioner weights (open_clip CoCa .safetensors/.bin)")
    add("lora_train_allow_downloads", True, "Allow captioner downloads (WD14 and CoCa weights on first use, into "
        "models/lora_train_captioners; onnxruntime for WD14)")
    add("lora_train_full_host_check", False, "Hash every byte of the loaded model before and after training (slow "
        "on big models; the default quick check compares tensor identity, version counters and sampled values)")
    add("lora_train_allowed_dirs", "", "Extra allowed dataset folders (one per line or ;-separated)", gr.Textbox,
        {"lines": 3})


def on_app_started(_demo, app):
    """REST routes, only under --api, with the same basic auth as the WebUI's API under --api-auth."""
    if not getattr(shared.cmd_opts, "api", False):
        return
    credentials = parse_credentials(getattr(shared.cmd_opts, "api_auth", None)) or None
    app.include_router(build_router(RUNNER, credentials=credentials, path_refusal=path_refusal(shared.cmd_opts)))


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
