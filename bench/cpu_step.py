"""CPU step time: our Trainer against a bare diffusers + peft + torch AdamW loop, in one process.

Both loops train the same randomly initialised UNet with the same LoRA targets, rank, batch, cached latents and
cached text embeddings. The goal (DESIGN.md, "Performance targets") is ours <= 1.05x the reference.

    HF_HUB_OFFLINE=1 python bench/cpu_step.py [--model mid|tiny] [--steps 8] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from lora_train.hosts.architectures import TINY  # noqa: E402
from lora_train.hosts.diffusers import build_random  # noqa: E402

METHOD = (
    "ours: Trainer.run() driven by a TrainCallbacks whose on_step() (called once per optimizer step) stamps the "
    "clocks after optimizer step W and after step W+N, and which checks that the window saw exactly steps "
    "W+1..W+N; the reference loop is stamped after the same optimizer steps. Setup, latent/text caching and "
    "export are outside both windows. Each repeat runs both loops back to back, alternating which goes first; "
    "the ratio is the median of the per-repeat ratios, on wall time and on this process's CPU time (which other "
    f"jobs on a shared machine inflate far less). A median below {common.IMPLAUSIBLE_RATIO} is reported as a "
    "measurement error."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mid", "tiny"), default="mid", help="mid: SD1 layout, 1/5 width")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before the window (default: one epoch, images / batch size, so our "
                             "caption cache is full as the reference's is: each run of ours starts with an empty "
                             "one and encodes a caption the first time it is drawn)")
    parser.add_argument("--repeats", type=int, default=5, help="A/B pairs")
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--profile", action="store_true",
                        help="after the A/B runs, one cProfile'd window of each loop: ms per step in the UNet "
                             "forward, backward, clip, AdamW and everything else, and our top functions")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="the clock whose ratio is the result (exit 3 when it is a measurement error); cpu: "
                             "this process's CPU time, for a machine shared with other jobs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> common.Comparison:
    args = parse_args(argv)
    if args.warmup is None:
        args.warmup = max(1, -(-args.images // args.batch_size))
    torch.set_num_threads(args.threads)
    arch = common.mid_arch() if args.model == "mid" else TINY
    bundle = build_random(arch, seed=0, name=f"bench-{args.model}")
    latent = arch.resolution // 8
    label = f"{args.model} SD1 {arch.unet['block_out_channels']} {latent}x{latent} b{args.batch_size}"
    with tempfile.TemporaryDirectory() as tmp:
        data = common.make_dataset(Path(tmp) / "data", args.images, arch.resolution)
        cfg = common.bench_config(data, Path(tmp) / "out", arch.resolution, batch_size=args.batch_size)
        _, trainer = common.run_ours(cfg, bundle, warmup=1, steps=1)  # warm-up run; fills the caches we share
        reference = common.ReferenceLoop(bundle.unet, common.cached_items(trainer, bundle.device), args.batch_size,
                                         rank=cfg.lora_rank, alpha=cfg.lora_alpha, lr=cfg.learning_rate,
                                         max_grad_norm=cfg.max_grad_norm)
        ours_targets = len(bundle.lora_targets(False))
        ref_targets = len(common.inject_lora(bundle.unet, cfg.lora_rank, cfg.lora_alpha)) // 2
        common.remove_lora(bundle.unet)
        if ours_targets != ref_targets:
            raise SystemExit(f"LoRA targets differ: ours {ours_targets}, reference {ref_targets}")
        reference.run(warmup=1, steps=1)
        result = common.alternate(lambda: common.run_ours(cfg, bundle, args.warmup, args.steps)[0],
                                  lambda: reference.run(args.warmup, args.steps), args.repeats)
        if args.profile:
            profiles = {"ours": common.WindowProfile(), "reference": common.WindowProfile()}
            common.run_ours(cfg, bundle, args.warmup, args.steps, profiles["ours"])
            reference.run(args.warmup, args.steps, profiles["reference"])
    print(f"cpu_step: torch {torch.__version__}, {torch.get_num_threads()} thread(s), {ours_targets} LoRA modules "
          f"rank {cfg.lora_rank}, AdamW, clip {cfg.max_grad_norm}, {args.repeats} A/B repeats x {args.steps} steps "
          f"(+{args.warmup} warm-up), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"method: {METHOD}")
    print(f"{'config':<40} | {'clock':<5} | {'ours ms/step (min-max)':>24} | {'reference ms/step (min-max)':>28}")
    for clock in ("wall", "cpu"):
        print(f"{label:<40} | {clock:<5} | {common.Comparison.describe(result.ours, clock):>24} | "
              f"{common.Comparison.describe(result.reference, clock):>28}")
    for clock in ("wall", "cpu"):
        try:
            result.check(clock)
            verdict = "goal <= 1.05" + (" (the result)" if clock == args.clock else "")
        except common.MeasurementError as exc:
            verdict = f"MEASUREMENT ERROR: {exc}"
        print(f"ratio ours/reference ({clock}) = {result.spread(clock)}; {verdict}")
    if args.profile:
        buckets = {name: profile.buckets(args.steps) for name, profile in profiles.items()}
        print(f"profile (cProfile on CPU time, one window each, ms per optimizer step; profiling slows Python "
              f"code): "
              f"{'part':<18} | {'ours':>8} | {'reference':>9} | difference")
        for part in buckets["ours"]:
            ours_ms, ref_ms = buckets["ours"][part], buckets["reference"][part]
            print(f"  {part:<18} | {ours_ms:8.1f} | {ref_ms:9.1f} | {ours_ms - ref_ms:+.1f}")
        print("our loop's own functions (lora_train/, CPU ms per step: own | with what they call):")
        for name, own, total in profiles["ours"].functions("lora_train/", args.steps)[:args.top]:
            print(f"  {own:7.2f} | {total:8.2f}  {name}")
        print(f"our window's top {args.top} functions by own time:")
        print(profiles["ours"].top(args.top))
    result.check(args.clock)
    return result


def run(argv: list[str] | None = None) -> int:
    """The command line: exit status 3 (and no result) when the measurement is broken."""
    try:
        main(argv)
    except common.MeasurementError as exc:
        print(f"MEASUREMENT ERROR, not a result: {exc}")
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
