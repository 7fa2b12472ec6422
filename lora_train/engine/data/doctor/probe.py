"""What the doctor learns from an image's pixels: a content hash (exact duplicates), a perceptual hash (near
duplicates that survive re-encoding and resizing), whether any pixel is transparent, and whether the file
decodes to the end (truncated downloads open fine and fail mid-decode).

Reading pixels is the slow part of a check, so each result is cached by the file's size and modification time
(in memory for the WebUI's process, in a JSON file for the CLI), JPEGs are decoded at a reduced scale (libjpeg's
DCT scaling: an eighth of the work), and files are probed on a thread pool (Pillow and hashlib release the GIL).
The pixels go through ``images.to_training_rgb``, the function the training loader uses.

The perceptual hash is the ``imagehash`` library's pHash (its dependencies, scipy and PyWavelets, are in every
WebUI venv; install.py adds only imagehash itself). Where it is missing, near duplicates go unchecked and the
report says so; nothing else depends on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lora_train.engine.data import images
from lora_train.engine.files import atomic_write_text

try:
    import imagehash
except ImportError:  # an install that could not add it: near duplicates go unchecked (``near_check_available``)
    imagehash = None

CACHE_VERSION = 1
DRAFT_SIZE = (64, 64)  # JPEG decode scale: at least this big, enough for a 32x32 pHash input
COLOUR_SIZE = (8, 8)  # the colour thumbnail that tells same-shape images of different colours apart
FLAT_STD = 2.0  # a grey thumbnail this even has no structure to hash (solid colours all hash alike)


@dataclass(frozen=True)
class Probe:
    """Pixel-level facts about one file. ``error`` set: the pixels do not decode (the rest is empty)."""

    sha: str  # BLAKE2b of the file's bytes
    phash: int | None = None  # 64-bit pHash of the image as trained; None for a flat (structureless) image
    colour: bytes | None = None  # 8x8 RGB thumbnail
    transparent: bool = False  # some pixel is not fully opaque
    error: str | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["colour"] = self.colour.hex() if self.colour is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> Probe:
        colour = bytes.fromhex(data["colour"]) if data.get("colour") else None
        return cls(data["sha"], data.get("phash"), colour, bool(data.get("transparent")), data.get("error"))


def probe(path: str | Path) -> Probe:
    """Hash and decode ``path`` (bytes read once)."""
    data = Path(path).read_bytes()
    sha = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("RGB", DRAFT_SIZE)
            image.load()  # raises for truncated or damaged data
            transparent = _transparent(image)
            rgb = images.to_training_rgb(image)
    except Exception as exc:  # noqa: BLE001 - any decoder error means the same to the user
        return Probe(sha, error=f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__)
    rgb.thumbnail((256, 256))
    grey = np.asarray(rgb.convert("L").resize((32, 32), Image.BOX), dtype=np.float32)
    phash = None if grey.std() < FLAT_STD or imagehash is None else int(str(imagehash.phash(rgb)), 16)
    colour = rgb.resize(COLOUR_SIZE, Image.BOX).tobytes()
    return Probe(sha, phash, colour, transparent)


def _transparent(image: Image.Image) -> bool:
    if not images.has_alpha(image):
        return False
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    return rgba.getchannel("A").getextrema()[0] < 255


class ProbeCache:
    """Probes keyed by path, valid while the file keeps its size and modification time; optionally kept in a
    JSON file between runs (written atomically; a damaged or older file is ignored)."""

    def __init__(self, file: str | Path | None = None):
        self.file = Path(file) if file else None
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, int, Probe]] = {}
        self._dirty = False
        if self.file is not None and self.file.is_file():
            self._entries = _read_cache(self.file)

    def get(self, path: Path) -> Probe:
        stat = path.stat()
        key = str(path.resolve())
        with self._lock:
            cached = self._entries.get(key)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        result = probe(path)
        with self._lock:
            self._entries[key] = (stat.st_size, stat.st_mtime_ns, result)
            self._dirty = True
        return result

    def save(self) -> None:
        """Write the cache file (if any) when something new was probed."""
        if self.file is None or not self._dirty:
            return
        with self._lock:
            rows = {key: [size, mtime, result.to_json()] for key, (size, mtime, result) in self._entries.items()}
            self._dirty = False
        atomic_write_text(self.file, json.dumps({"version": CACHE_VERSION, "entries": rows}))


def _read_cache(file: Path) -> dict[str, tuple[int, int, Probe]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("version") != CACHE_VERSION:
            return {}
        return {key: (int(size), int(mtime), Probe.from_json(row)) for key, (size, mtime, row)
                in data["entries"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


MEMORY_CACHE = ProbeCache()  # the WebUI's process: Load, Train and every fix re-check without re-reading pixels


CACHE_DIR_VARIABLE = "LORA_TRAIN_CACHE_DIR"


def default_cache_file() -> Path:
    """Where the CLI keeps probes between runs: ``$LORA_TRAIN_CACHE_DIR/doctor.json``, by default
    ``$XDG_CACHE_HOME/lora-train`` (``~/.cache/lora-train``)."""
    folder = os.environ.get(CACHE_DIR_VARIABLE)
    if not folder:
        folder = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-train")
    return Path(folder) / "doctor.json"


def probe_all(paths: Iterable[Path], cache: ProbeCache, on_progress: Callable[[int, int], None] | None = None,
              workers: int | None = None) -> dict[Path, Probe]:
    """Probe every path (cached ones for free) on a thread pool; ``on_progress(done, total)`` after each."""
    paths = list(paths)
    results: dict[Path, Probe] = {}
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (path, result) in enumerate(zip(paths, pool.map(cache.get, paths), strict=True), start=1):
            results[path] = result
            if on_progress is not None:
                on_progress(done, len(paths))
    return results


# ---------------------------------------------------------------------------------------------- duplicates

NEAR_BITS = 6  # pHash bits that may differ: re-encoded and resized copies differ by 0-4, unrelated photos by 16+
NEAR_COLOUR = 20.0  # mean per-channel difference (0-255) of the colour thumbnails
_POPCOUNT16 = np.unpackbits(np.arange(2**16, dtype=np.uint16).view(np.uint8)).reshape(-1, 16).sum(1).astype(np.uint8)


def near_check_available() -> bool:
    return imagehash is not None


def exact_groups(probes: dict[Path, Probe]) -> list[list[Path]]:
    """Files with identical bytes, each group in the given order."""
    by_sha: dict[str, list[Path]] = {}
    for path, result in probes.items():
        by_sha.setdefault(result.sha, []).append(path)
    return [group for group in by_sha.values() if len(group) > 1]


def near_groups(probes: dict[Path, Probe], max_bits: int = NEAR_BITS,
                max_colour: float = NEAR_COLOUR) -> list[list[Path]]:
    """Images that look the same (pHash within ``max_bits`` and colours alike) but are not byte-identical.

    Pairs are compared with numpy in row blocks (a thousand images: half a million pairs, milliseconds) and
    joined into groups; a group that is one set of exact copies is left to ``exact_groups``.
    """
    paths = [p for p, r in probes.items() if r.phash is not None and r.colour is not None]
    if len(paths) < 2:
        return []
    hashes = np.array([probes[p].phash for p in paths], dtype=np.uint64)
    colours = np.stack([np.frombuffer(probes[p].colour, dtype=np.uint8) for p in paths]).astype(np.int16)
    colours = colours.reshape(len(paths), -1, 3)
    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    block = 256
    for start in range(0, len(paths), block):
        xor = hashes[start:start + block, None] ^ hashes[None, :]
        bits = _POPCOUNT16[xor.view(np.uint16)].reshape(xor.shape[0], len(paths), 4).sum(-1)
        for i, j in zip(*np.nonzero(bits <= max_bits), strict=True):
            i += start
            if j <= i:
                continue
            colour = np.abs(colours[i] - colours[j]).mean(axis=0).max()
            if colour <= max_colour:
                parent[root(i)] = root(j)
    groups: dict[int, list[Path]] = {}
    for index, path in enumerate(paths):
        groups.setdefault(root(index), []).append(path)
    return [g for g in groups.values() if len(g) > 1 and len({probes[p].sha for p in g}) > 1]
