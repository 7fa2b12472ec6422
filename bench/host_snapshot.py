"""Cost of proving the WebUI's model unchanged: the quick snapshot against hashing every byte.

A job takes the snapshot once before training and once after, inside the WebUI's queue lock, so this time is
added to every job and every waiting txt2img. Builds a real-size SD1.5 (or SDXL) UNet, the bulk of the model,
with random weights (no download) and reports seconds per snapshot for both modes and their ratio.

    HF_HUB_OFFLINE=1 python bench/host_snapshot.py [--model sd1|sdxl] [--dtype fp16|fp32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import UNet2DConditionModel  # noqa: E402

from lora_train.hosts import architectures  # noqa: E402
from lora_train.webui.host_snapshot import HostSnapshot  # noqa: E402


def seconds(model: torch.nn.Module, full: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        HostSnapshot.take(model, full=full)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd1", choices=("sd1", "sdxl"))
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    arch = architectures.SD1 if args.model == "sd1" else architectures.SDXL
    unet = UNet2DConditionModel(**arch.unet).to(dtype)
    size = sum(t.numel() * t.element_size() for t in unet.state_dict().values()) / 2**30
    quick, full = seconds(unet, False, args.repeats), seconds(unet, True, args.repeats)
    print(f"{args.model} UNet {args.dtype}: {size:.2f} GiB, {len(unet.state_dict())} tensors")
    print(f"quick snapshot {quick:.3f} s, full hash {full:.3f} s, full/quick {full / quick:.0f}x "
          f"(a job takes two: {2 * quick:.2f} s vs {2 * full:.2f} s)")


if __name__ == "__main__":
    main()
