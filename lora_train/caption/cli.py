"""``python -m lora_train caption``: auto-caption an image folder (cli.py registers it via add_parser)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lora_train.caption.defaults import CATEGORIES, DEFAULT_MODEL, VOCAB_DIR

if TYPE_CHECKING:
    from lora_train.caption.options import CaptionOptions
    from lora_train.caption.run import ImageCaptioner

WD14_MODEL = "wd14"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``caption`` subcommand; its ``func`` is run_caption."""
    parser = subparsers.add_parser(
        "caption",
        help="auto-caption an image folder (CoCa + CLIP tags, or WD14 tags)",
        description="Write a caption for each image: metadata.csv (filename,prompt) or .txt sidecars. "
        "Existing captions are kept unless --overwrite. Weights are downloaded on first use unless --no-download.",
    )
    parser.add_argument("--input", required=True, type=Path, help="image folder")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", type=Path, help="caption CSV to write (default: INPUT/metadata.csv)")
    target.add_argument("--sidecar", action="store_true", help="write a .txt next to each image instead")
    parser.add_argument("--trigger", help="trigger word put first in every new caption")
    parser.add_argument("--overwrite", action="store_true", help="replace existing captions")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip CoCa model name, or {WD14_MODEL} for "
                        "SmilingWolf's WD14 tagger (needs onnxruntime)")
    parser.add_argument("--weights", type=Path, help="CoCa: local weights file (.safetensors or .bin); wd14: folder "
                        "with model.onnx and selected_tags.csv (downloaded there when missing)")
    parser.add_argument("--threshold", type=float, default=0.35, help="wd14: lowest probability of a general tag")
    parser.add_argument("--models-dir", type=Path, help="folder searched for the weights when --weights is not set")
    parser.add_argument("--model-config", type=Path, help="open_clip model config json (custom CoCa)")
    parser.add_argument("--no-download", action="store_true", help="never download weights (default: on first use)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--beams", type=int, default=1, help="1 = greedy decoding, more = beam search")
    parser.add_argument("--tags", type=int, default=1, help="tags per vocabulary category (0: none)")
    parser.add_argument(
        "--categories",
        default=",".join(CATEGORIES),
        help=f"comma-separated tag vocabularies (default: {','.join(CATEGORIES)})",
    )
    parser.add_argument("--max-tokens", type=int, default=75, help="CLIP token limit of a caption")
    parser.add_argument("--recursive", action="store_true", help="include images in subfolders")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run_caption)


def run_caption(args: argparse.Namespace) -> int:
    """Run the subcommand. Exit codes: 0 done, 1 some images unreadable (the rest written), 2 bad input."""
    from lora_train.caption.choices import CaptionSources, needs_line
    from lora_train.caption.errors import CaptionerError, WeightsMissingError
    from lora_train.caption.run import caption_images
    from lora_train.engine.data import caption_store

    try:
        options = _options(args)
        model = _load(args)
    except WeightsMissingError as exc:
        hint = " Or rerun without --no-download while online." if exc.downloads_off else ""
        print(f"error: {exc}{hint}\n{needs_line(CaptionSources(), cli=True)}", file=sys.stderr)
        return 2
    except (CaptionerError, caption_store.CaptionFileError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode = "sidecar" if args.sidecar else "csv"
    try:
        report = caption_images(
            args.input,
            model,
            options,
            mode=mode,
            csv_path=args.output,
            overwrite=args.overwrite,
            batch_size=args.batch_size,
            recursive=args.recursive,
            progress=not args.no_progress,
        )
    except (CaptionerError, caption_store.CaptionFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        model.unload()
    where = report.output if mode == "csv" else "sidecar .txt files"
    print(f"Captioned {len(report.written)} image(s), kept {len(report.kept)} existing caption(s) -> {where}")
    if report.failed:
        print(f"error: {report.failure_message()}", file=sys.stderr)
        return 1
    return 0


def _options(args: argparse.Namespace) -> CaptionOptions:
    from lora_train.caption.errors import CaptionerError
    from lora_train.caption.options import CaptionOptions, DecodeOptions

    if not args.input.is_dir():
        raise CaptionerError(f"Image folder not found: {args.input}")
    if args.batch_size < 1 or args.beams < 1 or args.max_tokens < 1:
        raise ValueError("--batch-size, --beams and --max-tokens must be at least 1")
    if not 0.0 < args.threshold <= 1.0:
        raise ValueError("--threshold must lie in (0, 1]")
    categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    unknown = [c for c in categories if not (VOCAB_DIR / f"{c}.txt").is_file()]
    if unknown:
        raise CaptionerError(f"Unknown tag categories {unknown}; known: {', '.join(CATEGORIES)}")
    return CaptionOptions(
        trigger=args.trigger,
        tags_per_category=args.tags,
        categories=categories,
        max_tokens=args.max_tokens,
        decode=DecodeOptions(beams=args.beams),
    )


def _load(args: argparse.Namespace) -> ImageCaptioner:
    from lora_train.caption.coca import Captioner
    from lora_train.caption.wd14 import TagOptions, WD14Tagger
    from lora_train.engine.devices import pick_device

    if args.model == WD14_MODEL:
        options = TagOptions(threshold=args.threshold)
        return WD14Tagger.load(args.weights, allow_download=not args.no_download, options=options)
    device = str(pick_device(args.device or "auto"))
    config = json.loads(args.model_config.read_text(encoding="utf-8")) if args.model_config else None
    return Captioner.load(
        args.model,
        weights=args.weights,
        models_dir=args.models_dir,
        device=device,
        model_config=config,
        allow_download=not args.no_download,
    )
