"""Peak memory of loading a single-file checkpoint in the CLI (goal: the model plus about one tensor).

    python bench/checkpoint_rss.py --family sd1           # SD1.5 size: 2.1 GB fp16 file, 4.3 GB fp32 model
    python bench/checkpoint_rss.py --family sd2           # the mid size: 2.6 GB file
    python bench/checkpoint_rss.py --family sdxl          # 6.9 GB file, 13.9 GB fp32 model (check `free -g`)
    python bench/checkpoint_rss.py --family sd1 --dtype float16   # the model kept in the file's dtype

It writes a random checkpoint in the WebUI's own format (LDM key names, fp16) once under --workdir, then, in
a fresh process, loads it as ``lora-train train`` does (``load_bundle`` + ``.to(cpu, dtype)``) and prints the
process's peak resident memory (``ru_maxrss``, which counts file pages mapped while they are read), its peak
anonymous memory (sampled ``RssAnon``: what the process allocated itself) and the model's own size.

The key names and shapes come from Stability's ldm modules built on the meta device (tests/ldm_models.py, the
configs of the public SD1.5 / SD2 / SDXL yaml files) plus transformers' CLIP-L and open_clip's text towers;
the file is written one tensor at a time because safetensors' save_file needs every tensor in memory at once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402

_SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
_CLIP_L = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}


def _open_clip_text(width: int, heads: int, layers: int, embed_dim: int) -> dict[str, torch.Size]:
    import open_clip

    model = open_clip.model.CLIP(
        embed_dim, open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers),
    )
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("visual.")}


def checkpoint_shapes(family: str) -> dict[str, torch.Size]:
    """Every tensor name of a WebUI checkpoint of ``family`` with its shape (meta tensors: no memory used)."""
    import ldm_models as M
    from ldm.models.autoencoder import AutoencoderKL
    from test_ldm_host import _FULL_SD1, _FULL_SD2, _FULL_SDXL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=_SD_VAE_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
        parts = {"first_stage_model.": {k: v.shape for k, v in vae.state_dict().items()}}
        if family == "sdxl":
            parts["model.diffusion_model."] = {k: v.shape for k, v in
                                               M.SDXLUNetModel(**_FULL_SDXL).state_dict().items()}
            parts["conditioner.embedders.0.transformer."] = {
                k: v.shape for k, v in CLIPTextModel(CLIPTextConfig(**_CLIP_L)).state_dict().items()}
            parts["conditioner.embedders.1.model."] = _open_clip_text(1280, 20, 32, 1280)
        else:
            parts["model.diffusion_model."] = {k: v.shape for k, v in M.UNetModel(
                **(_FULL_SD1 if family == "sd1" else _FULL_SD2)).state_dict().items()}
            if family == "sd1":
                parts["cond_stage_model.transformer."] = {
                    k: v.shape for k, v in CLIPTextModel(CLIPTextConfig(**_CLIP_L)).state_dict().items()}
            else:
                parts["cond_stage_model.model."] = _open_clip_text(1024, 16, 24, 1024)
    return {prefix + key: shape for prefix, shapes in parts.items() for key, shape in shapes.items()}


def write_checkpoint(path: Path, shapes: dict[str, torch.Size], seed: int = 0) -> None:
    """A .safetensors file of random fp16 tensors, written one tensor at a time (safetensors' own layout:
    8-byte header size, JSON header with byte offsets, then the data)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    generator = torch.Generator().manual_seed(seed)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for key, shape in shapes.items():
            scale = 0.02 if len(shape) > 1 else 0.1
            tensor = (torch.randn(shape, generator=generator) * scale).to(torch.float16)
            if key.endswith("position_ids"):
                tensor = torch.arange(shape[-1]).expand(shape).to(torch.float16)
            out.write(tensor.contiguous().numpy().tobytes())
    partial.replace(path)


def _rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(path: Path, dtype: torch.dtype) -> dict[str, float]:
    """Load ``path`` as the CLI does and report peak memory (GiB) with the model's size."""
    from lora_train.hosts.diffusers import load_bundle

    peak_anon = [_rss_anon()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak_anon[0] = max(peak_anon[0], _rss_anon())

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_anon = _rss_anon()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    bundle = load_bundle(str(path)).to("cpu", dtype)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    model = sum(t.numel() * t.element_size() for m in (bundle.unet, bundle.vae, *bundle.text_encoders)
                for t in [*m.parameters(), *m.buffers()])
    largest = max(t.numel() * t.element_size() for m in (bundle.unet, bundle.vae, *bundle.text_encoders)
                  for t in m.parameters())
    gib = 2**30
    return {
        "model_gib": model / gib, "largest_tensor_gib": largest / gib,
        "peak_rss_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / gib,
        "peak_rss_above_start_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss) / gib,
        "peak_anon_above_start_gib": (peak_anon[0] - base_anon) / gib, "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="the dtype the model is moved to (the CLI on CPU: float32)")
    parser.add_argument("--workdir", default="/tmp/lora-train-bench", help="where the random checkpoint is kept")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    path = Path(args.workdir) / f"random-{args.family}.safetensors"
    if args.measure_only:
        print(json.dumps(measure(path, getattr(torch, args.dtype))))
        return 0
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        write_checkpoint(path, checkpoint_shapes(args.family))
    # a fresh process, so the peak is this load's alone
    run = subprocess.run([sys.executable, __file__, "--family", args.family, "--dtype", args.dtype, "--workdir",
                          args.workdir, "--measure-only"], capture_output=True, text=True, check=False)
    if run.returncode:
        print(run.stdout, run.stderr, file=sys.stderr)
        return run.returncode
    result = json.loads(run.stdout.strip().splitlines()[-1])
    file_gib = path.stat().st_size / 2**30
    print(f"{args.family}: file {file_gib:.2f} GiB (fp16), model {result['model_gib']:.2f} GiB ({args.dtype}), "
          f"largest tensor {result['largest_tensor_gib'] * 1024:.0f} MiB")
    print(f"  peak RSS {result['peak_rss_gib']:.2f} GiB ({result['peak_rss_above_start_gib']:.2f} above the "
          f"process's start), peak anonymous memory above start {result['peak_anon_above_start_gib']:.2f} GiB, "
          f"load {result['seconds']:.1f} s")
    print(f"  peak RSS above start - model = {result['peak_rss_above_start_gib'] - result['model_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
