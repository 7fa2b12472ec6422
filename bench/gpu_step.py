"""GPU benchmark: it/s, peak VRAM and model-FLOPs utilisation of our trainer against the bare reference loop.

Part 1, SD1.5 architecture at real size (random weights), 512x512 (64x64 latents), batch 1 and 4, fp16 and bf16
weights with autocast: it/s, peak VRAM and MFU for our Trainer and for bench/common.py's ReferenceLoop.
Part 2, SDXL architecture at 1024x1024, batch 1, gradient checkpointing, cached latents, 8-bit AdamW: it/s and
peak VRAM against a 12 GB card.

MFU = FLOPs of one LoRA forward + backward (torch.utils.flop_counter.FlopCounterMode) x steps/s / the card's
dense bf16/fp16 tensor peak. FLOPs are counted on the ``meta`` device: shapes only, no compute, and attention
as its plain matmuls, i.e. model FLOPs (a fused attention kernel's backward recompute, which the counter adds on
cpu/cuda, is not useful work). Without CUDA it prints a message and exits 0; ``--flops-only`` runs anywhere.

    python bench/gpu_step.py                       # everything, on a CUDA machine
    python bench/gpu_step.py --skip-sdxl --batch-sizes 1 4 8 --precisions bf16
    python bench/gpu_step.py --flops-only --flops-model sd1    # CPU-safe
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from bench import common  # noqa: E402
from lora_train.engine.train.trainer import Trainer  # noqa: E402
from lora_train.hosts.architectures import SD1, SDXL, TINY, TINY_SDXL, Architecture  # noqa: E402
from lora_train.hosts.diffusers import build_random  # noqa: E402

# Dense (no sparsity) bf16/fp16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name().
# More specific names first. The consumer cards' numbers are fp16 with fp32 accumulation.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
]
FLOPS_MODELS: dict[str, tuple[Architecture, int, int]] = {  # arch, latent side, context width
    "tiny": (TINY, 8, 32), "tiny-sdxl": (TINY_SDXL, 8, 64), "mid": (common.mid_arch(), 32, 768),
    "sd1": (SD1, 64, 768), "sdxl": (SDXL, 128, 2048),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
GB = 1024**3


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--precisions", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="A/B pairs per configuration")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--skip-sd1", action="store_true")
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--sdxl-precision", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--sdxl-steps", type=int, default=10)
    parser.add_argument("--vram-budget-gb", type=float, default=12.0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the table for this card")
    parser.add_argument("--flops-only", action="store_true", help="only count FLOPs of one training step")
    parser.add_argument("--flops-model", choices=sorted(FLOPS_MODELS), default="sd1")
    parser.add_argument("--flops-batch", type=int, default=1)
    parser.add_argument("--flops-device", default="meta", help="meta (default: model FLOPs from shapes), cpu, cuda")
    return parser.parse_args(argv)


def count_flops(model: str, batch: int, device: str) -> int:
    """FLOPs of one LoRA training forward + backward of ``model``'s UNet (random weights or meta tensors)."""
    arch, latent, context = FLOPS_MODELS[model]
    with torch.device(device):
        unet = UNet2DConditionModel(**arch.unet)
    return common.train_step_flops(unet, batch, latent, context)


# ----------------------------------------------------------------------------------------- measuring
class VramClock(common.StepClock):
    """StepClock that also resets CUDA's peak counter at the window start and reads it at the window end."""

    def at_window_start(self) -> None:
        self.window_start_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def at_window_end(self) -> None:
        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated()


@dataclasses.dataclass
class Run:
    seconds_per_step: float
    peak_bytes: int
    window_start_bytes: int


def run_ours(cfg, bundle, warmup: int, steps: int) -> tuple[Run, Trainer]:
    cfg = dataclasses.replace(cfg, max_train_steps=warmup + steps + 1)
    clock = VramClock(warmup, steps, bundle.device)
    trainer = Trainer(cfg, bundle, clock)
    trainer.run()
    return Run(clock.timing.wall, clock.peak_bytes, clock.window_start_bytes), trainer


def run_reference(reference: common.ReferenceLoop, warmup: int, steps: int) -> Run:
    """Peak over the reference's whole call (fresh LoRA, optimizer, steps): with cached latents that is the
    steps' peak, since nothing else in the call allocates more."""
    torch.cuda.synchronize()
    start_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = reference.run(warmup, steps).wall
    torch.cuda.synchronize()
    return Run(seconds, torch.cuda.max_memory_allocated(), start_bytes)


def best(runs: list[Run]) -> Run:
    """The median run by time (its own peak); peaks barely vary between repeats."""
    ordered = sorted(runs, key=lambda r: r.seconds_per_step)
    return ordered[len(ordered) // 2]


def build_on_gpu(arch: Architecture, dtype: torch.dtype):
    """Random weights initialised directly on the GPU (seconds instead of minutes for SDXL on a CPU)."""
    with torch.device("cuda"):
        bundle = build_random(arch, seed=0, name=f"bench-{arch.family}")
    bundle.alphas_cumprod = bundle.alphas_cumprod.cpu()  # the trainer keeps it on the CPU like a loaded model
    return bundle.to("cuda", dtype)


def compare(label: str, cfg, bundle, reference_kwargs: dict, flops: int | None, peak: float | None,
            warmup: int, steps: int, repeats: int) -> dict:
    _, trainer = run_ours(cfg, bundle, warmup=1, steps=1)  # warm-up (cuDNN autotune, allocator) + caches
    items = common.cached_items(trainer, bundle.device)
    reference = common.ReferenceLoop(bundle.unet, items, cfg.batch_size, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                     lr=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm, **reference_kwargs)
    reference.run(1, 1)
    ours_runs: list[Run] = []
    ref_runs: list[Run] = []
    for repeat in range(repeats):
        order = [0, 1] if repeat % 2 == 0 else [1, 0]
        for which in order:
            if which == 0:
                ours_runs.append(run_ours(cfg, bundle, warmup, steps)[0])
            else:
                ref_runs.append(run_reference(reference, warmup, steps))
    ours, ref = best(ours_runs), best(ref_runs)
    ratios = sorted(o.seconds_per_step / r.seconds_per_step for o, r in zip(ours_runs, ref_runs, strict=True))
    ratio = ratios[len(ratios) // 2]
    if ratio < common.IMPLAUSIBLE_RATIO:
        raise common.MeasurementError(f"{label}: ours/reference = {ratio:.3f} < {common.IMPLAUSIBLE_RATIO} "
                                      f"(per repeat {ratios}): a broken measurement, not a speed-up")
    row = {"config": label, "ours_its": 1 / ours.seconds_per_step, "ref_its": 1 / ref.seconds_per_step,
           "ratio": ratio, "ratio_range": (ratios[0], ratios[-1]), "ours_peak": ours.peak_bytes / GB,
           "ref_peak": ref.peak_bytes / GB,
           "weights": ours.window_start_bytes / GB, "mfu_ours": None, "mfu_ref": None,
           "tflop": flops / 1e12 if flops else None}
    if flops and peak:
        row["mfu_ours"] = flops / ours.seconds_per_step / (peak * 1e12)
        row["mfu_ref"] = flops / ref.seconds_per_step / (peak * 1e12)
    return row


def print_rows(rows: list[dict]) -> None:
    def pct(value: float | None) -> str:
        return f"{100 * value:5.1f}%" if value is not None else "    -"

    print(f"{'config':<34} | {'ours it/s':>9} | {'ref it/s':>8} | {'time ratio (min-max)':>20} | "
          f"{'ours peak GB':>12} | {'ref peak GB':>11} | {'TFLOP/step':>10} | {'MFU ours':>8} | {'MFU ref':>7}")
    for r in rows:
        tflop = f"{r['tflop']:.2f}" if r["tflop"] else "-"
        spread = f"{r['ratio']:.3f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})"
        print(f"{r['config']:<34} | {r['ours_its']:9.2f} | {r['ref_its']:8.2f} | {spread:>20} | "
              f"{r['ours_peak']:12.2f} | {r['ref_peak']:11.2f} | {tflop:>10} | {pct(r['mfu_ours']):>8} | "
              f"{pct(r['mfu_ref']):>7}")


# ----------------------------------------------------------------------------------------- parts
def sd1_part(args, tmp: Path, peak: float | None) -> list[dict]:
    rows = []
    bundle = build_on_gpu(SD1, DTYPES[args.precisions[0]])
    data = common.make_dataset(tmp / "sd1", args.images, 512)
    flops = {bs: count_flops("sd1", bs, "meta") for bs in args.batch_sizes}
    for precision in args.precisions:
        bundle.to(bundle.device, DTYPES[precision])
        for batch in args.batch_sizes:
            cfg = common.bench_config(data, tmp / "out", 512, batch_size=batch, mixed_precision=precision)
            rows.append(compare(f"SD1.5 512px b{batch} {precision}", cfg, bundle, {"precision": precision},
                                flops[batch], peak, args.warmup, args.steps, args.repeats))
            print_rows(rows[-1:])
    del bundle
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def sdxl_part(args, tmp: Path, peak: float | None) -> list[dict]:
    optimizer = "adamw8bit"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("SDXL: bitsandbytes is not installed (pip install bitsandbytes); measuring with torch AdamW instead")
        optimizer = "adamw"
    torch.cuda.reset_peak_memory_stats()
    bundle = build_on_gpu(SDXL, DTYPES[args.sdxl_precision])
    data = common.make_dataset(tmp / "sdxl", 4, 1024)
    gc.collect()
    torch.cuda.empty_cache()
    flops = count_flops("sdxl", 1, "meta")
    cfg = common.bench_config(data, tmp / "out", 1024, batch_size=1, mixed_precision=args.sdxl_precision,
                              gradient_checkpointing=True, optimizer=optimizer, cache_latents=True)
    # The whole run's peak (VAE caching included) is what decides whether a card fits at all.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_ours(cfg, bundle, warmup=2, steps=2)
    whole_run_peak = torch.cuda.max_memory_allocated() / GB
    print(f"SDXL whole train() incl. VAE latent caching: peak {whole_run_peak:.2f} GB "
          f"({time.perf_counter() - start:.1f} s)")
    row = compare(f"SDXL 1024px b1 {args.sdxl_precision} ckpt {optimizer}", cfg, bundle,
                  {"precision": args.sdxl_precision, "gradient_checkpointing": True, "optimizer": optimizer},
                  flops, peak, 2, args.sdxl_steps, 1)
    print_rows([row])
    verdict = "fits" if max(row["ours_peak"], whole_run_peak) <= args.vram_budget_gb else "does NOT fit"
    print(f"SDXL peak VRAM: steps {row['ours_peak']:.2f} GB, whole run {whole_run_peak:.2f} GB -> {verdict} in "
          f"{args.vram_budget_gb:g} GB (weights of UNet + VAE + both text encoders resident: {row['weights']:.2f} GB)")
    row["whole_run_peak"] = whole_run_peak
    del bundle
    gc.collect()
    torch.cuda.empty_cache()
    return [row]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.flops_only:
        device = args.flops_device
        flops = count_flops(args.flops_model, args.flops_batch, device)
        print(f"FLOPs of one LoRA training step (forward + backward), {args.flops_model}, batch {args.flops_batch}, "
              f"on {device}: {flops / 1e12:.4f} TFLOP ({flops / 1e12 / args.flops_batch:.4f} TFLOP per sample)")
        return []
    if not torch.cuda.is_available():
        print("gpu_step: CUDA is not available, nothing to measure here; run this on an NVIDIA GPU. "
              "(CPU-safe part: python bench/gpu_step.py --flops-only --flops-model sd1)")
        return []
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    print(f"gpu_step: {name}, torch {torch.__version__}, peak {peak or 'unknown (use --peak-tflops)'} TFLOP/s dense; "
          f"{args.repeats} A/B repeats x {args.steps} steps (+{args.warmup} warm-up); ratio = ours/ref time per step")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if not args.skip_sd1:
            rows += sd1_part(args, tmp, peak)
        if not args.skip_sdxl:
            rows += sdxl_part(args, tmp, peak)
    print("\nsummary")
    print_rows(rows)
    return rows


if __name__ == "__main__":
    main()
