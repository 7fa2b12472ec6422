"""How long the dataset doctor takes on a folder of N images (default 1,000): a first scan (every image hashed and
decoded), a second one (the probe cache: nothing changed, no pixel read), and where the first one's time goes.

    python bench/doctor_scan.py [--images 1000] [--size 1024x768] [--format jpeg|png|mixed] [--folder DIR]

The images are made here (smooth random pictures, a caption each, a few duplicates and faults so every check
has work); ``--folder`` checks an existing folder instead. Prints seconds, nothing is asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lora_train.engine.config.settings import TrainConfig  # noqa: E402
from lora_train.engine.data import doctor  # noqa: E402
from lora_train.engine.data.doctor.probe import ProbeCache  # noqa: E402


def make_folder(folder: Path, count: int, size: tuple[int, int], kind: str) -> None:
    """``count`` captioned pictures; every 50th a re-encoded copy of the one before (near duplicates)."""
    rng = np.random.default_rng(0)
    for index in range(count):
        if index % 50 == 49:
            source = next(p for p in folder.glob(f"{index - 1:05d}.*") if p.suffix != ".txt")
            with Image.open(source) as image:
                image.convert("RGB").resize((size[0] // 2, size[1] // 2)).save(folder / f"{index:05d}.jpg", quality=70)
        else:
            grid = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
            picture = Image.fromarray(grid).resize(size, Image.BICUBIC)
            png = kind == "png" or (kind == "mixed" and index % 2)
            picture.save(folder / f"{index:05d}.{'png' if png else 'jpg'}", **({} if png else {"quality": 90}))
        (folder / f"{index:05d}.txt").write_text(f"zz, picture {index}, " + ", ".join(f"tag{index % 7}"
                                                                                     for _ in range(2)))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the made images")
    parser.add_argument("--format", choices=("jpeg", "png", "mixed"), default="jpeg")
    parser.add_argument("--folder", type=Path, help="check this folder instead of making one")
    parser.add_argument("--profile", action="store_true", help="cProfile the first scan (top 15 by cumulative)")
    args = parser.parse_args(argv)
    from lora_train.hosts.clip_tokenizer import caption_tokenizer

    tokenize = caption_tokenizer()
    tokenize("warm the tokenizer up")
    with tempfile.TemporaryDirectory(prefix="doctor-bench-") as scratch:
        folder = args.folder
        if folder is None:
            folder = Path(scratch) / "data"
            folder.mkdir()
            width, height = (int(v) for v in args.size.lower().split("x"))
            started = time.perf_counter()
            make_folder(folder, args.images, (width, height), args.format)
            print(f"made {args.images} {args.format} images of {width}x{height} in "
                  f"{time.perf_counter() - started:.1f} s")
        cfg = TrainConfig(train_data_dir=str(folder), resolution="1024", trigger_word="zz", batch_size=4)
        cache_file = Path(scratch) / "probes.json"
        profiler = cProfile.Profile() if args.profile else None
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        first = doctor.examine(cfg, tokenize, cache=ProbeCache(cache_file))
        if profiler:
            profiler.disable()
        cold = time.perf_counter() - started
        started = time.perf_counter()
        second = doctor.examine(cfg, tokenize, cache=ProbeCache(cache_file))  # a new process's cache: the file
        warm = time.perf_counter() - started
    print(first.summary())
    print(f"first scan: {cold:.2f} s ({cold / max(1, first.stats.get('images', 1)) * 1000:.1f} ms/image, "
          f"{os.cpu_count()} CPU core(s))")
    print(f"second scan (probe cache file): {warm:.2f} s; {second.summary()}")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)
    return {"first": cold, "second": warm}


if __name__ == "__main__":
    main()
