"""Samples/s of our trainer on 1 and on 2 processes (DDP, started by torchrun), same per-process batch.

Each run starts ``torchrun --nproc_per_node N`` on this very script, whose processes build the same random
model, train ``--warmup + --steps`` steps on synthetic images and time the window with ``common.StepClock``
(the same stamps as cpu_step.py, taken on rank 0). Samples/s = batch_size x N x steps / seconds.

On a GPU machine every process takes its own GPU (``cuda:<local rank>``); with one GPU both processes share it,
which checks the path, not the speed-up. Without CUDA the processes share the CPU cores, so 2 processes are not
expected to be faster; the script says which case it measured.

    python bench/multi_process.py [--model tiny|mid|sd1] [--batch-size 2] [--processes 1 2] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from lora_train.hosts.architectures import SD1, TINY  # noqa: E402

RESULT = "bench-result: "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "mid", "sd1"), default="tiny",
                        help="tiny: built-in test model; mid: SD1 layout at 1/5 width, 256 px; sd1: SD1.5 at 512 px")
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the window")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--precision", choices=("no", "fp16", "bf16"), default="bf16",
                        help="mixed precision on a GPU (the CPU always trains in float32)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _arch(model: str):
    return {"tiny": TINY, "mid": common.mid_arch(), "sd1": SD1}[model]


def worker(args: argparse.Namespace) -> None:
    """One process of a run (torchrun started it): train and, on rank 0, print the timing as JSON."""
    from lora_train.engine.devices import pick_device
    from lora_train.engine.train import distributed
    from lora_train.engine.train.trainer import Trainer
    from lora_train.hosts.diffusers import build_random

    with distributed.started() as team, tempfile.TemporaryDirectory() as out:
        device = pick_device(team.use_device("auto"))
        precision = args.precision if device.type == "cuda" else "no"
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        arch = _arch(args.model)
        bundle = build_random(arch).to(device, dtype)
        cfg = common.bench_config(Path(args.data), Path(out), arch.resolution, batch_size=args.batch_size,
                                  max_train_steps=args.warmup + args.steps + 1, mixed_precision=precision,
                                  device=str(device), logging_dir="")
        clock = common.StepClock(args.warmup, args.steps, device)
        Trainer(cfg, bundle, clock, team=team).run()
        if team.main:
            samples = args.batch_size * team.world * args.steps
            print(RESULT + json.dumps({"processes": team.world, "seconds": clock.seconds, "samples": samples,
                                       "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                       else "CPU"}), flush=True)


def run(processes: int, args: argparse.Namespace, data: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, "--worker", "--data", str(data), "--model", args.model, "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--precision", args.precision]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"{processes}-process run failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[0][len(RESULT):])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    gpus = torch.cuda.device_count()
    if gpus == 0:
        print(f"no GPU: {max(args.processes)} processes share {os.cpu_count()} CPU core(s), so more processes are not "
              "expected to be faster here; this checks the path (run it on a GPU machine for the speed-up)")
    elif gpus < max(args.processes):
        print(f"{gpus} GPU(s) for up to {max(args.processes)} processes: processes share a GPU (a check of the path)")
    arch = _arch(args.model)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = common.make_dataset(Path(tmp) / "data", args.images, arch.resolution)
        for processes in args.processes:
            result = run(processes, args, data)
            result["samples_per_s"] = result["samples"] / result["seconds"]
            results.append(result)
    base = results[0]["samples_per_s"]
    print(f"model {args.model}, batch {args.batch_size} per process, {args.steps} timed steps, "
          f"device {results[0]['device']}")
    print("| processes | global batch | samples/s | vs first |")
    print("|---|---|---|---|")
    for result in results:
        print(f"| {result['processes']} | {args.batch_size * result['processes']} | {result['samples_per_s']:.2f} | "
              f"{result['samples_per_s'] / base:.2f}x |")
    return results


if __name__ == "__main__":
    main()
