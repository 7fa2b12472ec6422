"""What a grid shows when the user says nothing but which LoRA: its saved steps, the default strengths, and two
prompts (the trigger word, and a caption the LoRA never trained on), at the run's seed and resolution."""

from __future__ import annotations

import json
from pathlib import Path

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.output.card import read_card
from lora_train.engine.output.export import read_lora_metadata
from lora_train.engine.output.grid import DEFAULT_STRENGTHS, GridSpec, find_rows


class GridError(ValueError):
    """The grid cannot be made as asked (no such LoRA, nothing to compare); the message says what to do."""


def held_out_caption(cfg: TrainConfig) -> str | None:
    """The caption of the first held-out image (``validation_split``), else of the dataset's last image."""
    from lora_train.engine.data import dataset
    from lora_train.engine.data.split import split_for_run

    try:
        scanned = dataset.scan(cfg)
    except (ValueError, OSError):
        return None
    train, held = split_for_run(scanned, cfg)
    items = held.items or [item for item in train.items if not item.is_reg][-1:]
    return items[0].caption if items else None


def _tag_prompt(meta: dict[str, str]) -> str | None:
    """Without the dataset: the most frequent tags the LoRA was trained with (kohya's ss_tag_frequency)."""
    try:
        frequency = json.loads(meta.get("ss_tag_frequency") or "{}")
    except ValueError:
        return None
    counts: dict[str, int] = {}
    for tags in frequency.values():
        for tag, count in tags.items():
            counts[tag] = counts.get(tag, 0) + int(count)
    top = sorted(counts, key=lambda tag: -counts[tag])[:8]
    return ", ".join(top) or None


def default_prompts(final: Path, cfg: TrainConfig | None = None) -> list[str]:
    meta = read_lora_metadata(final)
    trigger = (cfg.trigger_word if cfg else None) or read_card(final).get("activation text") or \
        meta.get("modelspec.trigger_phrase") or ""
    caption = held_out_caption(cfg) if cfg else _tag_prompt(meta)
    prompts = [p for p in dict.fromkeys([trigger.strip(), (caption or "").strip()]) if p]
    return prompts or ["a photo"]


def _size(meta: dict[str, str]) -> tuple[int, int]:
    text = meta.get("modelspec.resolution", "512x512")
    try:
        width, height = (int(v) for v in text.split("x"))
    except ValueError:
        width, height = 512, 512
    return width, height


def plan_grid(final: str | Path, folders: list[Path] = (), *, cfg: TrainConfig | None = None,
              prompts: list[str] | None = None, strengths: list[float] | None = None, negative: str = "",
              seed: int | None = None, steps: int = 20, cfg_scale: float = 7.0,
              size: tuple[int, int] | None = None, sampler: str = "Euler") -> GridSpec:
    """The grid of ``final`` and its saved steps (looked for beside it and in ``folders``)."""
    final = Path(final)
    if not final.is_file():
        raise GridError(f"{final} is not a LoRA file; pick one from the Lora folder or a run's output")
    rows = find_rows(final, list(folders))
    if len(rows) < 2:
        raise GridError(f"{final.name}: no saved steps beside it or in its run folder; train with "
                        "save_every_n_epochs (or save_every_n_steps) to compare epochs")
    meta = read_lora_metadata(final)
    width, height = size or _size(meta)
    strengths = [float(w) for w in (strengths or DEFAULT_STRENGTHS) if float(w) != 0]
    if not strengths:
        raise GridError("strengths: give at least one strength other than 0 (the plain column is always there)")
    return GridSpec(
        name=final.stem, rows=rows, prompts=[p for p in (prompts or default_prompts(final, cfg)) if p.strip()],
        strengths=strengths, negative=negative, seed=int(seed if seed is not None else meta.get("ss_seed", 42)),
        steps=steps, cfg_scale=cfg_scale, width=width, height=height, sampler=sampler,
    )
