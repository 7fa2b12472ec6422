"""The dataset doctor: before a minute of training, what is wrong with the images, the captions and the run.

``examine`` reads the dataset with the reader training uses (``reader.read``, the same folder rules, repeats,
captions and trigger rule; the same buckets) and returns a ``Report`` of findings. Errors are exactly what stops
training (the reader's problems, plus images nothing can be learned from); warnings say what will train badly;
notes say what training does. The tab, the CLI and the REST API only render the report; ``fixes`` changes the
dataset without losing anything. Nothing here imports gradio or the WebUI.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import dataset as data
from lora_train.engine.data import reader
from lora_train.engine.data.doctor import caption_checks, image_checks, run_checks
from lora_train.engine.data.doctor.caption_checks import Tokenize
from lora_train.engine.data.doctor.findings import FIXES, Finding, Report
from lora_train.engine.data.doctor.probe import MEMORY_CACHE, ProbeCache, probe_all
from lora_train.engine.data.split import split_for_run

__all__ = ["FIXES", "Finding", "Report", "examine"]

# the one-click fix of each of the reader's problems
_PROBLEM_FIXES = {"image-unreadable": "exclude", "caption-missing": "caption"}


def examine(cfg: TrainConfig, tokenize: Tokenize | None = None, preset: str | None = None,
            cache: ProbeCache | None = None, on_progress: Callable[[int, int], None] | None = None) -> Report:
    """Every finding about ``cfg``'s dataset and run.

    ``tokenize`` counts caption tokens as the model's tokenizer does (None skips the length check); ``preset``
    (Character, Style, Concept) sets how many images are few; ``cache`` keeps pixel probes between calls (default:
    this process's); ``on_progress(done, total)`` follows the pixel pass.
    """
    started = time.perf_counter()
    try:
        reading = reader.read(cfg)
    except reader.DatasetError as exc:
        finding = Finding("dataset-unreadable", "error", f"{exc}; pick the folder with your training images.")
        return Report([finding], seconds=time.perf_counter() - started)
    findings = [Finding(p.code, "error", p.message.rstrip(":") + (f" {p.hint}" if p.hint else "."),
                        p.files, p.notes, fix=_PROBLEM_FIXES.get(p.code)) for p in reading.problems(cfg)]
    readable = [e.path for e in reading.entries if e.header is not None]
    probes = probe_all(readable, cache or MEMORY_CACHE, on_progress)
    (cache or MEMORY_CACHE).save()
    damaged = {str(path) for path, result in probes.items() if result.error}
    built = data.build([e for e in reading.entries if str(e.path) not in damaged], cfg)
    trained, held_out = split_for_run(built, cfg)  # the run's numbers are the trained part's
    stats = {"images": len(reading.entries), **run_checks.run_stats(trained, cfg)}
    findings += image_checks.check_damage(probes)
    findings += image_checks.check_sizes(built, cfg)
    findings += image_checks.check_headers(reading, probes, cfg.alpha_mask and not cfg.conditioning_data_dir)
    sizes = {e.path: e.header.size for e in reading.entries if e.header is not None}
    findings += image_checks.check_duplicates({p: r for p, r in probes.items() if not r.error}, sizes)
    findings += caption_checks.check_captions(reading.entries, cfg, tokenize)
    findings += run_checks.check_run(trained, cfg, preset, stats)
    findings += run_checks.check_held_out(held_out, cfg)
    findings += image_checks.check_skipped(reading)
    report = Report(findings, stats)
    if report.ok:
        report.dataset = built
    report.seconds = time.perf_counter() - started
    return report
