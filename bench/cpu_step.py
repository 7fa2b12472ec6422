"""CPU step time: our Trainer against a bare diffusers + peft + torch AdamW loop, in one process.

Both loops train the same randomly initialised UNet with the same LoRA targets, rank, batch, cached latents and
cached text embeddings. The goal (DESIGN.md, "Performance targets") is ours <= 1.05x the reference.

    HF_HUB_OFFLINE=1 python bench/cpu_step.py [--model mid|tiny] [--steps 8] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
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
    "ours: Trainer.run() driven by a TrainCallbacks whose should_stop() (called at the top of every loop "
    "iteration) stamps perf_counter before step W and before step W+N, so the window holds exactly N whole "
    "iterations of our loop; the reference loop is stamped at the same two points. Setup, latent/text caching "
    "and export are outside both windows. Each repeat runs both loops back to back, alternating which goes "
    "first; the ratio is the median of the per-repeat ratios."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mid", "tiny"), default="mid", help="mid: SD1 layout, 1/5 width")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the window")
    parser.add_argument("--repeats", type=int, default=5, help="A/B pairs")
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--images", type=int, default=8)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> common.Comparison:
    args = parse_args(argv)
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
    print(f"cpu_step: torch {torch.__version__}, {torch.get_num_threads()} thread(s), {ours_targets} LoRA modules "
          f"rank {cfg.lora_rank}, AdamW, clip {cfg.max_grad_norm}, {args.repeats} A/B repeats x {args.steps} steps "
          f"(+{args.warmup} warm-up)")
    print(f"method: {METHOD}")
    print(f"{'config':<40} | {'ours ms/step (min-max)':>24} | {'reference ms/step (min-max)':>28} | ratio")
    print(f"{label:<40} | {common.Comparison.describe(result.ours):>24} | "
          f"{common.Comparison.describe(result.reference):>28} | {result.ratio:.3f}")
    ratios = sorted(o / r for o, r in zip(result.ours, result.reference, strict=True))
    print(f"ratio ours/reference = {result.ratio:.3f} (per-repeat {ratios[0]:.3f}-{ratios[-1]:.3f}); goal <= 1.05")
    return result


if __name__ == "__main__":
    main()
