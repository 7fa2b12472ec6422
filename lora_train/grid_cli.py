"""``lora-train grid``: the epoch x strength grid of a run from the terminal, drawn with the diffusers model.

``--config x.yaml`` finds the run's final file and saved steps where ``train`` wrote them (``output_dir``,
``output_name``) and its held-out caption; or name a LoRA file with ``--lora`` and the model with ``--base-model``.
Same layout, same files and the same card update (``--choose ROW,COLUMN``) as the tab. Ctrl-C stops after the
current image; running the same command again continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("grid", help="render a LoRA's saved steps x strengths grid and set its preferred weight")
    parser.add_argument("--config", help="the run's training YAML (finds its files, model and held-out caption)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--lora", help="a LoRA file (its saved steps are looked for beside it)")
    parser.add_argument("--base-model", help="checkpoint, diffusers folder, tiny or tiny-sdxl (with --lora)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: the trigger "
                        "word and a held-out caption)")
    parser.add_argument("--strengths", default="", help="comma-separated, default 0.4,0.6,0.8,1.0,1.2 (plus plain)")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--seed", type=int, help="default: the run's seed")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per image")
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--size", help="WIDTHxHEIGHT, default: the LoRA's training resolution")
    parser.add_argument("--choose", metavar="ROW,COLUMN", help="after rendering, set the card's preferred weight "
                        "to that cell's strength (rows and columns count from 0; column 0 is the plain image)")
    parser.add_argument("--keep-step", action="store_true", help="with --choose: copy that row's file over the "
                        "final one (the replaced file is copied aside first)")
    parser.set_defaults(func=run_grid)


def _size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    return width, height


def _strengths(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.split(",") if v.strip()] or None
    except ValueError:
        raise ValueError(f"--strengths {text!r} is not a comma-separated list of numbers") from None


def run_grid(args: argparse.Namespace) -> int:
    from lora_train.engine.config import yaml_io
    from lora_train.engine.config.settings import TrainConfig
    from lora_train.engine.output import grid
    from lora_train.engine.output.grid_plan import GridError, plan_grid
    from lora_train.engine.output.grid_render import BundleRenderer
    from lora_train.hosts.diffusers import load_model

    if args.config:
        cfg = yaml_io.load(args.config, args.set)
        final = Path(args.lora) if args.lora else Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
        if args.base_model:
            cfg = yaml_io.from_dict({**cfg.to_dict(), "base_model": args.base_model})
    elif args.lora:
        cfg, final = None, Path(args.lora)
    else:
        raise GridError("give --config (the run's YAML) or --lora FILE with --base-model")
    folder = final.parent
    spec = plan_grid(final, [folder], cfg=cfg, prompts=args.prompt or None, strengths=_strengths(args.strengths),
                     negative=args.negative, seed=args.seed, steps=args.steps, cfg_scale=args.cfg_scale,
                     size=_size(args.size))
    model_cfg = cfg or TrainConfig(base_model=args.base_model or "tiny")
    stop = {"asked": False}

    def ask_stop(*_: object) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        print("stopping after this image (Ctrl-C again to abort); run the same command to continue")

    previous = signal.signal(signal.SIGINT, ask_stop)
    try:
        with BundleRenderer(load_model(model_cfg), spec) as renderer:
            result = grid.render(spec, folder, renderer, lambda: stop["asked"],
                                 lambda done, total: print(f"\rgrid {done}/{total}", end="", flush=True))
    finally:
        signal.signal(signal.SIGINT, previous)
    print()
    if result.stopped:
        print(f"stopped: {result.rendered} image(s) rendered; the same command continues")
        return 1
    print(json.dumps({"grid": [str(p) for p in result.images], "rows": [r.label for r in spec.rows],
                      "columns": spec.columns, "rendered": result.rendered, "reused": result.reused}, indent=2))
    if args.choose:
        return _choose(args, spec, final)
    return 0


def _choose(args: argparse.Namespace, spec, final: Path) -> int:
    from lora_train.engine.output import card, grid
    from lora_train.engine.output.grid_plan import GridError

    try:
        row, column = (int(v) for v in args.choose.split(","))
    except ValueError:
        raise GridError(f"--choose {args.choose!r} is not ROW,COLUMN (e.g. 2,4)") from None
    picked = grid.cell_choice(spec, row, column)
    if picked is None:
        raise GridError(f"--choose {args.choose}: no LoRA cell there ({len(spec.rows)} rows; columns 1-"
                        f"{len(spec.columns) - 1} hold strengths, 0 is the plain image)")
    chosen, weight = picked
    path = card.set_preferred_weight(final, weight)
    print(f"preferred weight {weight:g} written to {path}")
    if args.keep_step and Path(chosen.path).resolve() != final.resolve():
        backup = card.keep_as_final(Path(chosen.path), final, final.parent / f"{final.stem}-replaced")
        print(f"{final} is now {chosen.label}" + (f"; the previous file was copied to {backup}" if backup else ""))
    return 0
