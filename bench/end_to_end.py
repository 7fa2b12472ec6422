"""End-to-end overhead of a short run: how much of a train() call is not training steps.

Times one ``lora_train.engine.train.trainer.train()`` call and splits it into the steps themselves and what
surrounds them (dataset scan, LoRA injection, latent caching, text caching, export with metadata, teardown). The goal
(DESIGN.md) is overhead <= 10% of the run. ``--profile`` runs cProfile over the overhead regions only (not the
steps) and prints the top functions with file:line.

    HF_HUB_OFFLINE=1 python bench/end_to_end.py [--model mid|tiny] [--steps 30] [--images 8] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from lora_train.engine.data import caches, dataset  # noqa: E402
from lora_train.engine.network import lora
from lora_train.engine.output import export
from lora_train.engine.train import checkpoints, progress, trainer
from lora_train.hosts.architectures import TINY  # noqa: E402
from lora_train.hosts.diffusers import build_random  # noqa: E402

# (owner, attribute, label, counts as overhead outside the steps). Nested labels start with two spaces.
OVERHEAD_TOP = ("dataset scan", "LoRA inject", "latent caching", "text encoding (cache fill)", "export (final file)",
                "LoRA remove + flag restore")


class Timers:
    """Wall time per label for wrapped functions; optionally one cProfile over every wrapped call."""

    def __init__(self, profile: bool):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.profiler = cProfile.Profile() if profile else None
        self._profiling = False

    @contextlib.contextmanager
    def wrap(self, owner: object, attr: str, label: str) -> Iterator[None]:
        original = getattr(owner, attr)
        owned = attr in vars(owner)  # a module's function or a class's method, not one found on the class

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start_profile = self.profiler is not None and not self._profiling
            if start_profile:
                self._profiling = True
                self.profiler.enable()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1
                if start_profile:
                    self.profiler.disable()
                    self._profiling = False

        setattr(owner, attr, timed)
        try:
            yield
        finally:
            if owned:
                setattr(owner, attr, original)
            else:  # an instance attribute we added: drop it so the class's method shows through again
                delattr(owner, attr)


class LoopClock(progress.TrainCallbacks):
    """The loop starts at ``on_start`` (after latent caching, right before the first iteration) and counts its
    optimizer steps in ``on_step``; ``should_stop`` cannot mark the loop: latent caching calls it per image."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.steps = 0

    def on_start(self, total_steps: int, start_step: int) -> None:
        self.first = time.perf_counter()

    def on_step(self, info: progress.StepInfo) -> None:
        self.steps += 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mid", "tiny"), default="mid")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--profile", action="store_true", help="cProfile the overhead regions, print the top items")
    parser.add_argument("--top", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    """Runs the benchmark, prints the breakdown and returns the overhead fraction."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    arch = common.mid_arch() if args.model == "mid" else TINY
    bundle = build_random(arch, seed=0, name=f"bench-{args.model}")
    timers = Timers(args.profile)
    clock = LoopClock()
    export_start: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = common.make_dataset(Path(tmp) / "data", args.images, arch.resolution)
        cfg = common.bench_config(data, Path(tmp) / "out", arch.resolution, batch_size=args.batch_size,
                                  max_train_steps=args.steps)
        original_export = checkpoints.RunWriter.export

        def marked_export(self, *a, **k):
            export_start.append(time.perf_counter())
            return original_export(self, *a, **k)

        patches = [
            (dataset, "scan", "dataset scan"),
            (lora, "inject", "LoRA inject"),
            (caches.LatentCache, "cache_all", "latent caching"),
            (dataset, "load_pixels", "  image decode + resize"),
            (bundle, "encode_images", "  VAE encode"),
            (bundle, "encode_text", "text encoding (cache fill)"),
            (checkpoints.RunWriter, "export", "export (final file)"),
            (export, "training_metadata", "  metadata (hashes, tag counts)"),
            (lora, "kohya_state_dict", "  LoRA state dict"),
            (export, "write_lora", "  write safetensors"),
            (lora, "remove", "LoRA remove + flag restore"),
        ]
        with contextlib.ExitStack() as stack:
            checkpoints.RunWriter.export = marked_export  # type: ignore[method-assign]
            stack.callback(setattr, checkpoints.RunWriter, "export", original_export)
            for owner, attr, label in patches:
                stack.enter_context(timers.wrap(owner, attr, label))
            start = time.perf_counter()
            result = trainer.train(cfg, bundle, clock)
            total = time.perf_counter() - start
    if result.output is None or clock.first is None or clock.steps != result.steps:
        raise common.MeasurementError(f"the loop clock saw {clock.steps} optimizer steps of {result.steps} (or no "
                                      "start / no output): the breakdown would time something else")
    loop = export_start[-1] - clock.first
    text_in_loop = timers.seconds["text encoding (cache fill)"]
    steps = loop - text_in_loop
    overhead = total - steps
    rows = [(label, timers.seconds[label], timers.calls[label]) for _, _, label in patches]
    known = sum(timers.seconds[label] for label in OVERHEAD_TOP)
    print(f"end_to_end: {args.model} model, {args.images} images at {arch.resolution}px, batch {args.batch_size}, "
          f"{result.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("method: wall time of one train() call; 'steps' runs from the loop's first iteration to the start of the "
          "final export, minus the text encoding that fills the cache during the first steps")
    print(f"{'part':<36} | {'seconds':>8} | {'% of run':>8} | calls")
    print(f"{'steps (training proper)':<36} | {steps:8.3f} | {100 * steps / total:7.1f}% | {result.steps}")
    for label, seconds, calls in rows:
        print(f"{label:<36} | {seconds:8.3f} | {100 * seconds / total:7.1f}% | {calls}")
    other = overhead - known
    print(f"{'other (optimizer, scheduler, glue)':<36} | {other:8.3f} | {100 * other / total:7.1f}% |")
    print(f"{'total train()':<36} | {total:8.3f} | {100.0:7.1f}% |")
    print(f"overhead = {overhead:.3f} s of {total:.3f} s = {100 * overhead / total:.1f}% of the run "
          f"(ratio {overhead / total:.3f}); per step {1000 * steps / result.steps:.1f} ms; goal <= 10%")
    if timers.profiler is not None:
        stream = io.StringIO()
        stats = pstats.Stats(timers.profiler, stream=stream)
        stats.sort_stats("cumulative").print_stats(args.top)
        print("cProfile of the overhead regions only (cumulative):")
        print(stream.getvalue())
    return overhead / total


if __name__ == "__main__":
    main()
