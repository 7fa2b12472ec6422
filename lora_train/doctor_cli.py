"""``lora-train doctor``: check a dataset (and the run a config implies) before training; optionally fix it.

``--config x.yaml`` checks what ``train --config x.yaml`` would train; a folder checks it with the default
settings (and its ``metadata.csv`` when there is one, as the tab does). Plain text, or ``--json`` (the REST API's
shape). Exit codes: 0 no errors, 1 errors found (training would refuse), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_train.engine.config.settings import TrainConfig
    from lora_train.engine.data.doctor import Report

FIX_CHOICES = ("exclude", "trigger", "tags")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``doctor`` subcommand (argparse only: --help stays instant)."""
    parser = subparsers.add_parser(
        "doctor", help="check a dataset before training: damaged or tiny images, duplicates, captions, buckets",
        description="Check the images, captions and run a config (or a folder with default settings) implies. "
        "Exit code 1 when an error would stop training.")
    parser.add_argument("folder", nargs="?", type=Path, help="image folder (default settings); or use --config")
    parser.add_argument("--config", type=Path, help="YAML config: check what `train --config` would train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set resolution=1024 (repeatable)")
    parser.add_argument("--preset", choices=("Character", "Style", "Concept"),
                        help="the kind of LoRA, for how many images are few")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (the REST API's shape)")
    parser.add_argument("--fix", action="append", choices=FIX_CHOICES, default=[],
                        help="exclude: move damaged, too-small and duplicate images (with captions) to _excluded/; "
                        "trigger: write the trigger word first in the captions; tags: drop repeated tags. "
                        "Repeatable; nothing is deleted. Missing captions: run `lora-train caption`.")
    parser.add_argument("--no-cache", action="store_true", help="re-read every image instead of the probe cache")
    parser.set_defaults(func=run_doctor)


def load_config(args: argparse.Namespace) -> TrainConfig:
    from lora_train.engine.config import yaml_io
    from lora_train.engine.config.settings import ConfigError
    from lora_train.engine.data import caption_store

    if (args.config is None) == (args.folder is None):
        raise ConfigError("--config", "give either a config file (--config x.yaml) or an image folder, not both")
    if args.config is not None:
        return yaml_io.load(args.config, args.set)
    data = {"train_data_dir": str(args.folder)}
    csv_path = args.folder / caption_store.METADATA_NAME
    if csv_path.is_file():
        data["metadata_path"] = str(csv_path)
    data.update(dict(yaml_io.parse_override(item) for item in args.set))
    return yaml_io.from_dict(data)


def run_doctor(args: argparse.Namespace) -> int:
    from lora_train.engine.data import doctor
    from lora_train.engine.data.doctor.fixes import apply
    from lora_train.engine.data.doctor.probe import ProbeCache, default_cache_file
    from lora_train.hosts.clip_tokenizer import caption_tokenizer

    cfg = load_config(args)
    cache = ProbeCache(None if args.no_cache else default_cache_file())
    tokenize = caption_tokenizer()

    def examine() -> Report:
        with _progress() as on_progress:
            return doctor.examine(cfg, tokenize, args.preset, cache, on_progress)

    report = examine()
    for fix in args.fix:  # each fix on what the one before left, checked again
        result = apply(report, cfg, fix)
        print(f"fix {fix}: {result.summary()}", file=sys.stderr)
        report = examine()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1


class _progress:
    """A tqdm bar on stderr for scans of many images (hidden when stderr is not a terminal)."""

    def __enter__(self):
        self.bar = None
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="image", desc="checking", file=sys.stderr, disable=None, leave=False)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
