"""``lora-train`` / ``python -m lora_train``: train, inspect, caption, grid, ui and generate from a terminal.

Only argparse runs at import: each subcommand imports torch and friends when it runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from lora_train.quiet import silence_dependency_noise

if TYPE_CHECKING:
    from lora_train.console import ConsoleCallbacks
    from lora_train.engine.train.distributed import Team
    from lora_train.engine.train.progress import TrainResult


def run_train(args: argparse.Namespace) -> int:
    from lora_train import llm  # light; the text-generation engine loads only for an LLM config
    from lora_train.console import ConsoleCallbacks
    from lora_train.engine.config.checks import ConfigError
    from lora_train.engine.train import distributed

    with distributed.started() as team:  # one process (SOLO) unless torchrun / accelerate started several
        try:
            if llm.is_llm_config_file(args.config, args.set):
                if team.world > 1:
                    raise ConfigError("task_type", "text-generation trains on one process; run it without torchrun")
                callbacks = ConsoleCallbacks()
                return _train(functools.partial(llm.run, args.config, args.set, callbacks, merge=args.merge),
                              callbacks)
            from lora_train.engine import preflight
            from lora_train.engine.config import yaml_io
            from lora_train.engine.train.trainer import train
            from lora_train.hosts.base_model import base_model_family
            from lora_train.hosts.clip_tokenizer import caption_tokenizer
            from lora_train.hosts.diffusers import load_model

            cfg = yaml_io.load(args.config, args.set)
            if cfg.multi_gpu and not distributed.under_launcher():
                from lora_train import launcher

                return launcher.launch(cfg, ["train", "--config", args.config, *(f"--set={s}" for s in args.set)])
            cfg.device = team.use_device(cfg.device)
            # every input (the dataset doctor's summary line first, from the main process), before the model loads
            scanned = preflight.check(cfg, base_model_family(cfg.base_model), caption_tokenizer(),
                                      on_report=lambda report: team.main and print(report.summary() +
                                                                                    _doctor_hint(report)))
            callbacks = ConsoleCallbacks(quiet=not team.main)
            job = functools.partial(train, cfg, load_model(cfg), callbacks, dataset=scanned, team=team)
            return _train(job, callbacks, team.main)
        except Exception as exc:
            if team.world == 1:
                raise
            _one_report(exc, team)


def _train(job: Callable[[], TrainResult], callbacks: ConsoleCallbacks, main: bool = True) -> int:
    """Run ``job`` with Ctrl-C asking it to stop after the current step; rank 0 says how it ended."""
    previous = signal.signal(signal.SIGINT, callbacks.request_stop)
    try:
        result = job()
    finally:
        signal.signal(signal.SIGINT, previous)
        if callbacks.bar:
            callbacks.bar.close()
    if main:
        state = "stopped" if result.stopped else "done"
        print(f"{state}: {result.steps}/{result.total_steps} steps -> {result.output}")
    return 0


def _one_report(exc: Exception, team: Team) -> NoReturn:
    """A failure in a run on several processes: the first process to fail says it in one line (a bug adds its
    traceback), the others stay silent. The process then leaves at once (exit code as ``main`` gives), without
    the orderly goodbye to the others, who may be blocked in a collective: the launcher then ends them all."""
    expected = isinstance(exc, (ValueError, OSError))
    if team.first_to_fail():
        if not expected:
            traceback.print_exception(exc)
        where = f"process {team.rank} of {team.world}"
        message = exc if expected else f"{type(exc).__name__}: {exc}"
        # on a line of its own: rank 0's progress bar may be on the terminal's last line
        print(f"\nerror ({where}): {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2 if expected else 1)


def _doctor_hint(report) -> str:  # noqa: ANN001 - a doctor Report (imported lazily)
    """What to run for the details, when there are any."""
    return "; details: lora-train doctor --config <this config>" if report.errors or report.of("warning") else ""


def readable_time(value: str) -> str:
    """A unix-seconds metadata value (kohya's ``ss_training_*_at``) as ISO-8601 local time; others unchanged."""
    try:
        moment = datetime.datetime.fromtimestamp(float(value))
    except (ValueError, OverflowError, OSError):
        return value
    return moment.astimezone().isoformat(timespec="seconds")


def describe(path: str) -> dict:
    """Family, network type, rank, alpha, module counts and metadata (sorted, times readable) of a LoRA file."""
    from lora_train.engine.output import weight_kinds
    from lora_train.engine.output.export import read_lora

    tensors, metadata = read_lora(path)
    modules = sorted({key.split(".")[0] for key in tensors})
    downs = [tensors[f"{m}.{name}"] for m in modules for name in ("lora_down.weight", "hada_w1_b", "lokr_w2_b")
             if f"{m}.{name}" in tensors]
    alphas = {float(tensors[f"{m}.alpha"]) for m in modules if f"{m}.alpha" in tensors}
    shown = sorted(key for key in metadata if key not in ("ss_tag_frequency", "ss_bucket_info"))
    return {
        "file": str(path),
        "family": metadata.get("ss_base_model_version", "unknown"),
        "network": weight_kinds.network_type({key: tuple(t.shape) for key, t in tensors.items()}),
        "rank": sorted({int(d.shape[0]) for d in downs}),
        "alpha": sorted(alphas),
        "modules": {
            "unet": sum(m.startswith("lora_unet_") for m in modules),
            "text_encoder": sum(m.startswith("lora_te") for m in modules),
        },
        "dtype": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "metadata": {k: readable_time(metadata[k]) if k.endswith("_at") else metadata[k] for k in shown},
    }


def run_inspect(args: argparse.Namespace) -> int:
    from lora_train.engine import preflight

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone, for `| jq`
        preflight.lora_header(args.file, "file")
        info = describe(args.file)
    print(json.dumps(info, indent=2))
    return 0


def build_parser(prog: str = "lora-train") -> argparse.ArgumentParser:
    """Every subcommand's arguments; importing nothing heavy (tests check torch stays unloaded)."""
    from lora_train import (
        doctor_cli,
        grid_cli,
        llm,  # light: argparse only; the text-generation engine loads when `generate` runs
    )
    from lora_train.caption import cli as caption_cli
    from lora_train.webui import standalone

    parser = argparse.ArgumentParser(prog=prog, description="Train LoRA adapters from a YAML config, inspect them, "
                                     "caption an image folder, or serve the training tab in a browser.")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="train a LoRA from a YAML config")
    train_parser.add_argument("--config", required=True, help="YAML file (kohya / lora-scripts key names)")
    train_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                              help="override one config key, e.g. --set learning_rate=5e-5 (repeatable)")
    train_parser.add_argument("--merge", action="store_true",
                              help="text-generation configs: also write <name>-merged (adapter folded in)")
    train_parser.set_defaults(func=run_train)
    inspect_parser = sub.add_parser("inspect", help="print a LoRA's family, rank, alpha, modules and metadata as JSON")
    inspect_parser.add_argument("file")
    inspect_parser.set_defaults(func=run_inspect)
    doctor_cli.add_parser(sub)
    caption_cli.add_parser(sub)
    grid_cli.add_parser(sub)
    standalone.add_parser(sub)
    llm.add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None, prog: str = "lora-train") -> int:
    """Run one subcommand; returns its exit code (2: bad input, one line on stderr)."""
    silence_dependency_noise()
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("lora_train"):
            raise  # our own import: a bug, keep the traceback
        print(f"error: {args.command} needs the Python package {exc.name!r}, which is not installed here (README, "
              "CLI: which python to use and what to install)", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        # bad input (ConfigError, DatasetError, CaptionFileError, WeightsFileError are ValueErrors) or a file
        # that cannot be read/written: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
