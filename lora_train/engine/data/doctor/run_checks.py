"""Findings about the run the settings imply: images per bucket, buckets smaller than a batch, how many steps and
epochs, how many images the preset's kind of LoRA wants, regularisation against training images, the images
``validation_split`` holds out.

Counts are the trainer's own (``dataset.epoch_batches`` and ``dataset.run_length``), so the steps shown are the
steps that will run.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import dataset as data
from lora_train.engine.data.doctor.findings import Finding

# Training images a LoRA of each kind usually wants (the tab's presets; None: no preset chosen).
FEW_IMAGES = {"Character": (10, "15-50 varied images of the character"),
              "Style": (20, "30-100 images in the style, of varied subjects"),
              "Concept": (10, "15-50 images showing the concept in varied settings"),
              None: (5, "10 or more varied images")}


def run_stats(dataset: data.Dataset, cfg: TrainConfig) -> dict[str, Any]:
    """The numbers behind the run findings (also the report's ``stats``)."""
    batches_per_epoch, total_steps = data.run_length(dataset, cfg) if dataset.items else (0, 0)
    micro_steps = total_steps * cfg.gradient_accumulation_steps
    epochs = micro_steps / batches_per_epoch if batches_per_epoch else 0.0
    buckets = Counter(item.bucket for item in dataset.items)
    return {
        "train_images": sum(not i.is_reg for i in dataset.items),
        "reg_images": sum(i.is_reg for i in dataset.items),
        "train_samples_per_epoch": dataset.num_train_images,
        "reg_samples_per_epoch": dataset.num_reg_images,
        "batches_per_epoch": batches_per_epoch,
        "steps": total_steps,
        "epochs": round(epochs, 2),
        "buckets": {f"{w}x{h}": n for (w, h), n in sorted(buckets.items())},
    }


def check_run(dataset: data.Dataset, cfg: TrainConfig, preset: str | None, stats: dict[str, Any]) -> list[Finding]:
    if not dataset.items:
        return []
    return [*_length(cfg, stats), *_buckets(dataset, cfg), *_few(stats, preset), *_reg(stats, cfg)]


def _length(cfg: TrainConfig, stats: dict[str, Any]) -> list[Finding]:
    samples = stats["train_samples_per_epoch"] + stats["reg_samples_per_epoch"]
    images = stats["train_images"]
    seen = stats["epochs"] * stats["train_samples_per_epoch"] / images if images else 0
    times = f"{seen:.0f}" if seen >= 10 else f"{seen:.1f}"
    source = f"max_train_steps {cfg.max_train_steps}" if cfg.max_train_steps else f"epochs {cfg.epochs}"
    return [Finding("run-length", "info",
                    f"{stats['steps']} step(s) ({source}): {stats['epochs']:g} epoch(s) of "
                    f"{stats['batches_per_epoch']} batch(es); an epoch is {samples} samples (images x repeats) at "
                    f"batch_size {cfg.batch_size}, so each training image is seen about {times} times.")]


def _buckets(dataset: data.Dataset, cfg: TrainConfig) -> list[Finding]:
    samples: Counter = Counter()
    members: dict[tuple[int, int], list[str]] = {}
    for item in dataset.items:
        samples[item.bucket] += item.repeats
        members.setdefault(item.bucket, []).append(str(item.path))
    table = ", ".join(f"{w}x{h}: {len(members[(w, h)])}" for (w, h) in sorted(members))
    findings = [Finding("buckets", "info", f"{len(members)} bucket(s), images in each: {table}.")]
    if cfg.batch_size > 1:
        small = {b: n for b, n in samples.items() if n < cfg.batch_size}
        if small:
            files = [f for b in sorted(small) for f in members[b]]
            notes = {f: f"bucket {b[0]}x{b[1]}: {small[b]} sample(s)" for b in small for f in members[b]}
            findings.append(Finding(
                "bucket-below-batch", "warning",
                f"{len(small)} bucket(s) hold fewer samples (images x repeats) than batch_size {cfg.batch_size}: "
                "their images always train in smaller batches, so those steps are noisier. Add images of the same "
                "shape, crop them to a common shape, or lower batch_size.", files, notes))
    return findings


def _few(stats: dict[str, Any], preset: str | None) -> list[Finding]:
    minimum, wanted = FEW_IMAGES.get(preset, FEW_IMAGES[None])
    images = stats["train_images"]
    if images >= minimum:
        return []
    kind = f"a {preset} LoRA" if preset in FEW_IMAGES and preset else "a LoRA"
    return [Finding("few-images", "warning",
                    f"Only {images} training image(s): {kind} usually wants {wanted}. With this few it copies these "
                    "pictures (pose, background, framing) instead of learning the subject; add more if you can.")]


def _reg(stats: dict[str, Any], cfg: TrainConfig) -> list[Finding]:
    reg, train = stats["reg_samples_per_epoch"], stats["train_samples_per_epoch"]
    if not reg:
        return []
    text = (f"{stats['reg_images']} regularisation image(s), {reg} samples per epoch against {train} training "
            f"samples, at prior_loss_weight {cfg.prior_loss_weight:g}.")
    if reg > train:
        return [Finding("reg-outweighs", "warning",
                        f"{text} Most of each epoch trains on regularisation images, so the LoRA learns the subject "
                        "slowly: lower the reg folder's repeats (its N_ prefix) or use fewer reg images.")]
    return [Finding("reg-images", "info", text)]


def check_held_out(held_out: data.Dataset, cfg: TrainConfig) -> list[Finding]:
    """Which images validation takes away from training (the same files every run with this seed)."""
    if not held_out.items:
        return []
    files = [str(item.path) for item in held_out.items]
    return [Finding("validation-held-out", "info",
                    f"{len(files)} image(s) are held out for validation (validation_split {cfg.validation_split:g}): "
                    "they never train; the validation loss is measured on them. Set validation_split: 0 to train on "
                    "every image.", files)]
