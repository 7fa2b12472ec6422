"""``python -m lora_train train|inspect|caption``: the headless entry points."""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from lora_train.engine import config as config_module
from lora_train.engine import preflight
from lora_train.engine.config import TrainConfig
from lora_train.engine.export import read_lora
from lora_train.engine.progress import StepInfo, TrainCallbacks
from lora_train.engine.trainer import train
from lora_train.hosts.base_model import base_model_family
from lora_train.webui import standalone


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def host_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """Frozen base weights in half precision on a GPU when training mixed precision; fp32 on the CPU."""
    if device.type == "cpu" or cfg.mixed_precision == "no":
        return torch.float32
    return torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16


def load_model(cfg: TrainConfig):
    """The diffusers bundle for ``cfg.base_model``, on the configured device."""
    from lora_train.hosts.diffusers import load_bundle

    device = pick_device(cfg.device)
    bundle = load_bundle(cfg.base_model, cfg.v_parameterization, cfg.clip_skip)
    return bundle.to(device, host_dtype(cfg, device))


class ConsoleCallbacks(TrainCallbacks):
    """tqdm progress; the first Ctrl-C stops cleanly after the current step and saves, a second one aborts."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.stop_requested = False

    def on_start(self, total_steps: int, start_step: int) -> None:
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def on_step(self, info: StepInfo) -> None:
        assert self.bar is not None
        self.bar.update(info.step - self.bar.n)
        if info.loss is not None:  # read every log_every_n_steps only
            self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", epoch=info.epoch)

    def on_checkpoint(self, step: int, path: Path) -> None:
        tqdm.write(f"checkpoint: {path}")

    def on_log(self, message: str) -> None:
        tqdm.write(message)

    def should_stop(self) -> bool:
        return self.stop_requested

    def request_stop(self, *_: object) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        tqdm.write("stopping after this step (Ctrl-C again to abort without saving)")


def run_train(args: argparse.Namespace) -> int:
    from lora_train import llm  # light; the text-generation engine loads only for an LLM config

    callbacks = ConsoleCallbacks()
    if llm.is_llm_config_file(args.config, args.set):
        job = functools.partial(llm.run, args.config, args.set, callbacks, merge=args.merge)
    else:
        cfg = config_module.load(args.config, args.set)
        scanned = preflight.check(cfg, base_model_family(cfg.base_model))  # every input, before the model loads
        job = functools.partial(train, cfg, load_model(cfg), callbacks, dataset=scanned)
    previous = signal.signal(signal.SIGINT, callbacks.request_stop)
    try:
        result = job()
    finally:
        signal.signal(signal.SIGINT, previous)
        if callbacks.bar:
            callbacks.bar.close()
    state = "stopped" if result.stopped else "done"
    print(f"{state}: {result.steps}/{result.total_steps} steps -> {result.output}")
    return 0


def describe(path: str) -> dict:
    """Family, rank, alpha, module counts and metadata of a LoRA file."""
    tensors, metadata = read_lora(path)
    modules = sorted({key.split(".")[0] for key in tensors})
    downs = [tensors[f"{m}.lora_down.weight"] for m in modules if f"{m}.lora_down.weight" in tensors]
    alphas = {float(tensors[f"{m}.alpha"]) for m in modules if f"{m}.alpha" in tensors}
    return {
        "file": str(path),
        "family": metadata.get("ss_base_model_version", "unknown"),
        "rank": sorted({int(d.shape[0]) for d in downs}),
        "alpha": sorted(alphas),
        "modules": {
            "unet": sum(m.startswith("lora_unet_") for m in modules),
            "text_encoder": sum(m.startswith("lora_te") for m in modules),
        },
        "dtype": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "metadata": {k: v for k, v in metadata.items() if k not in ("ss_tag_frequency", "ss_bucket_info")},
    }


def run_inspect(args: argparse.Namespace) -> int:
    preflight.lora_header(args.file, "file")
    print(json.dumps(describe(args.file), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="train a LoRA from a YAML config")
    train_parser.add_argument("--config", required=True, help="YAML file (kohya / lora-scripts key names)")
    train_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                              help="override one config key, e.g. --set learning_rate=5e-5 (repeatable)")
    train_parser.add_argument("--merge", action="store_true",
                              help="text-generation configs: also write <name>-merged (adapter folded in)")
    train_parser.set_defaults(func=run_train)
    inspect_parser = sub.add_parser("inspect", help="show family, rank, alpha, modules and metadata of a LoRA")
    inspect_parser.add_argument("file")
    inspect_parser.set_defaults(func=run_inspect)
    try:
        from lora_train.caption import cli as caption_cli
    except ImportError:  # the captioner is optional at run time (open_clip missing)
        pass
    else:
        caption_cli.add_parser(sub)
    standalone.add_parser(sub)
    from lora_train import llm  # light: argparse only; the text-generation engine loads when `generate` runs

    llm.add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        # bad input (ConfigError, DatasetError, CaptionFileError, WeightsFileError are ValueErrors) or a file
        # that cannot be read/written: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
