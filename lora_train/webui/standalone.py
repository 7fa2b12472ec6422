"""``python -m lora_train ui``: the tab's Blocks served on their own, over a diffusers bundle.

The same Blocks as in the WebUI; the model comes from ``base_model`` (the built-in tiny model by default, any
checkpoint file or diffusers folder) and stays loaded between runs (the trainer leaves its weights untouched).
Ctrl-C works as in ``train``: the first stops a running job after its current step and saves it, then the
server exits; a second one quits at once without saving.
"""

from __future__ import annotations

import argparse
import inspect
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_train.webui.paths import PathPolicy, resolve

if TYPE_CHECKING:
    from lora_train.webui.jobs import JobRunner


def make_app(args: argparse.Namespace) -> tuple[Any, JobRunner]:
    """The Blocks and the runner for the standalone UI (tests build it without serving)."""
    from lora_train.caption.choices import CaptionSources
    from lora_train.webui.diffusers_host import DiffusersHost
    from lora_train.webui.jobs import JobRunner
    from lora_train.webui.ui import UISettings, build_ui

    output = resolve(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    roots = [resolve(p) for p in args.allow_dir] if args.allow_dir else None
    if roots is not None:
        roots.append(output)
    runner = JobRunner(DiffusersHost(args.base_model), PathPolicy(output_root=output, input_roots=roots))
    defaults: dict[str, Any] = {"base_model": args.base_model}
    if args.config:
        from lora_train.engine.config import yaml_io

        defaults = {**yaml_io.load(args.config).to_dict(), "base_model": args.base_model}
        defaults.pop("output_dir", None)
    sources = CaptionSources(coca_weights=args.captioner_weights, allow_download=not args.no_download)
    settings = UISettings(datasets_root=output / "datasets", captioner_weights=args.captioner_weights,
                          defaults=defaults, captioner_setting="the --captioner-weights option of the ui command",
                          caption_sources=lambda: sources,
                          downloads_setting="the ui command without --no-download")
    return build_ui(runner, settings), runner


def run_ui(args: argparse.Namespace) -> int:
    from lora_train.webui.ui import enable_queue

    demo, runner = make_app(args)
    enable_queue(demo)
    css = (Path(__file__).resolve().parents[2] / "style.css")
    launch: dict[str, Any] = {"server_name": args.host, "server_port": args.port, "show_error": True,
                              "prevent_thread_lock": True, "quiet": True}  # our line below gives the address
    if css.is_file():  # the WebUI adds an extension's style.css itself; standalone we do
        if "css" in inspect.signature(demo.launch).parameters:
            launch["css"] = css.read_text(encoding="utf-8")
        else:  # gradio 3 reads it from the Blocks
            demo.css = css.read_text(encoding="utf-8")
    print(f"LoRA Train UI on http://{args.host}:{args.port} (outputs in {resolve(args.output_dir)})", flush=True)
    demo.launch(**launch)
    try:
        return serve_until_interrupted(runner)
    finally:
        demo.close()


def serve_until_interrupted(runner: JobRunner) -> int:
    """Wait for Ctrl-C; then stop a running job after its current step and wait while it saves. A second Ctrl-C
    quits at once (exit code 130), naming the folder whose last checkpoint can be resumed."""
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        while not interrupted.wait(0.5):
            pass
        job = runner.current
        if job is None or not job.active:
            print("Ctrl-C: closing the server.", flush=True)
            return 0
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"Ctrl-C: stopping {job.cfg.output_name} after the current step and saving it (Ctrl-C again to "
              "quit without saving)", flush=True)
        runner.stop(job.id)
        try:
            while not job.done_event.wait(0.5):
                pass
        except KeyboardInterrupt:
            print(f"Quit without saving; the last checkpoint (if any) is in {job.cfg.output_dir}", flush=True)
            return 130
        print(job.log[-1] if job.log else job.state, flush=True)  # the worker's summary: state, steps, file
        return 0
    finally:
        signal.signal(signal.SIGINT, previous)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``ui`` on the CLI's subcommands."""
    parser = sub.add_parser("ui", help="serve the LoRA Train tab in a browser without the WebUI")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--base-model", default="tiny", help="tiny, a checkpoint file or a diffusers folder")
    parser.add_argument("--output-dir", default="output", help="where LoRAs, checkpoints and uploads go")
    parser.add_argument("--config", help="YAML config whose values pre-fill the form")
    parser.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                        help="only accept dataset/config paths inside these folders (repeatable)")
    parser.add_argument("--captioner-weights", help="open_clip CoCa weights file for the Caption button")
    parser.add_argument("--no-download", action="store_true",
                        help="never download captioner weights (default: CoCa/WD14 weights on first use when online)")
    parser.set_defaults(func=run_ui)
