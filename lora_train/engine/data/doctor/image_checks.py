"""Findings about the image files themselves: damage, size against the bucket they train in, crop, rotation,
transparency, pixel modes, extensions that lie, duplicates, files and folders training skips.

Sizes and buckets are the training items' own (``dataset.build``), so an upscale factor or a crop fraction here is
what the loader will do (cover-resize to the bucket, centre crop).
"""

from __future__ import annotations

from pathlib import Path

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data.dataset import Dataset, ImageItem
from lora_train.engine.data.doctor.findings import Finding
from lora_train.engine.data.doctor.probe import Probe, exact_groups, near_check_available, near_groups
from lora_train.engine.data.images import WIDE_MODES
from lora_train.engine.data.reader import Reading

LATENT_FACTOR = 8  # the VAE's downscale: a bucket of 512 px is a latent of 64
UPSCALE_WARN = 2.0  # beyond this the image trains visibly soft
CROP_WARN = 0.25  # share of the image its bucket crops away
EXTENSIONS = {  # Pillow format -> the extensions that say it
    "JPEG": {".jpg", ".jpeg"}, "MPO": {".jpg", ".jpeg"}, "PNG": {".png"}, "WEBP": {".webp"}, "BMP": {".bmp"},
    "GIF": {".gif"}, "TIFF": {".tif", ".tiff"},
}
MODE_NOTES = {
    "P": "palette colours", "PA": "palette colours with alpha", "L": "greyscale", "LA": "greyscale with alpha",
    "1": "1-bit black and white", "I": "16-bit greyscale", "I;16": "16-bit greyscale", "F": "32-bit float greyscale",
    "YCbCr": "YCbCr", "LAB": "Lab colour", "HSV": "HSV colour",
}


def scale_and_crop(item: ImageItem) -> tuple[float, float]:
    """(upscale factor, share of the image area cropped away) of the loader's cover-resize + centre crop."""
    (width, height), (bucket_w, bucket_h) = item.size, item.bucket
    scale = max(bucket_w / width, bucket_h / height)
    covered = max(bucket_w, round(width * scale)) * max(bucket_h, round(height * scale))
    return scale, 1.0 - (bucket_w * bucket_h) / covered


def check_damage(probes: dict[Path, Probe]) -> list[Finding]:
    damaged = {str(p): r.error for p, r in probes.items() if r.error}
    if not damaged:
        return []
    return [Finding("image-truncated", "error",
                    f"{len(damaged)} image(s) open but do not decode to the end (cut short, often an interrupted "
                    "copy or download): re-save or download them again, or move them aside.",
                    list(damaged), {p: str(e) for p, e in damaged.items()}, fix="exclude")]


def check_sizes(dataset: Dataset, cfg: TrainConfig) -> list[Finding]:
    """Too small to train (smaller than its own latent), strongly upscaled, strongly cropped."""
    tiny, upscaled, cropped = {}, {}, {}
    for item in dataset.items:
        scale, crop = scale_and_crop(item)
        size = f"{item.size[0]}x{item.size[1]}"
        bucket = f"{item.bucket[0]}x{item.bucket[1]}"
        if scale > LATENT_FACTOR:
            tiny[str(item.path)] = f"{size}, bucket {bucket}: upscaled {scale:.1f}x"
        elif scale > UPSCALE_WARN:
            upscaled[str(item.path)] = f"{size} upscaled {scale:.1f}x to {bucket}"
        if crop >= CROP_WARN:
            aspect = max(item.size) / min(item.size)
            cropped[str(item.path)] = f"{size} (aspect {aspect:.1f}:1) in bucket {bucket}: {crop:.0%} cropped away"
    findings = []
    if tiny:
        findings.append(Finding(
            "image-too-small", "error",
            f"{len(tiny)} image(s) are smaller than the latent of the bucket they train in (the bucket / "
            f"{LATENT_FACTOR}): the model would learn upscaling blur, not the image. Replace them with larger "
            "versions, or move them aside.", list(tiny), tiny, fix="exclude"))
    if upscaled:
        findings.append(Finding(
            "image-upscaled", "warning",
            f"{len(upscaled)} image(s) are upscaled more than {UPSCALE_WARN:g}x to their bucket at resolution "
            f"{cfg.resolution}: they train soft. Use larger originals, or a lower resolution.",
            list(upscaled), upscaled))
    if cropped:
        hint = ("turn on enable_bucket so each image trains at its own aspect ratio" if not cfg.enable_bucket else
                f"their aspect ratio is beyond the buckets (max_bucket_reso {cfg.max_bucket_reso}, min_bucket_reso "
                f"{cfg.min_bucket_reso}); crop them yourself to what matters")
        findings.append(Finding(
            "image-cropped", "warning",
            f"{len(cropped)} image(s) lose {CROP_WARN:.0%} or more of their area to the centre crop: {hint}.",
            list(cropped), cropped))
    return findings


def check_headers(reading: Reading, probes: dict[Path, Probe], alpha_mask: bool = False) -> list[Finding]:
    """Extension that lies, EXIF rotation, transparency (``alpha_mask``: the run ignores transparent pixels),
    pixel modes."""
    lying, rotated, transparent, modes, cmyk = {}, [], [], {}, []
    for entry in reading.entries:
        header, path = entry.header, str(entry.path)
        if header is None:
            continue
        expected = EXTENSIONS.get(header.format or "")
        if expected is not None and entry.path.suffix.lower() not in expected:
            lying[path] = f"{entry.path.suffix} file holding {header.format}"
        if header.rotated:
            rotated.append(path)
        result = probes.get(entry.path)
        if result is not None and result.transparent:
            transparent.append(path)
        if header.mode == "CMYK":
            cmyk.append(path)
        elif header.mode in MODE_NOTES or header.mode in WIDE_MODES:
            modes[path] = MODE_NOTES.get(header.mode, header.mode)
    findings = []
    if lying:
        findings.append(Finding(
            "image-extension", "warning",
            f"{len(lying)} file(s) have an extension that does not match their content. Training reads them by "
            "content, but other tools (and some WebUI extensions) go by the name: rename them (and their caption "
            "files).", list(lying), lying))
    if rotated:
        findings.append(Finding(
            "image-rotated", "info",
            f"{len(rotated)} image(s) carry an EXIF rotation: training rotates them as image viewers show them "
            "(the loader applies the EXIF orientation) and buckets them by the rotated size. Nothing to do.",
            rotated))
    if transparent and alpha_mask:
        findings.append(Finding(
            "image-transparent", "info",
            f"{len(transparent)} image(s) have transparent pixels: with alpha_mask, training learns only where "
            "they are opaque (the transparent part, shown as white, adds no loss). Nothing to do.", transparent))
    elif transparent:
        findings.append(Finding(
            "image-transparent", "warning",
            f"{len(transparent)} image(s) have transparent pixels: training composites them onto white, so the "
            "LoRA learns white where they are transparent. Set alpha_mask: true to train only where they are "
            "opaque, or flatten them onto the background you want.", transparent))
    if cmyk:
        findings.append(Finding(
            "image-cmyk", "warning",
            f"{len(cmyk)} image(s) are CMYK: training converts them to RGB without a colour profile, so colours "
            "may shift. Convert them to sRGB in an image editor.", cmyk))
    if modes:
        findings.append(Finding(
            "image-mode", "info",
            f"{len(modes)} image(s) are not 8-bit RGB: training converts them to 8-bit RGB (16-bit and float grey "
            "are scaled, not clipped). Nothing to do unless the colours look wrong.", list(modes), modes))
    return findings


def _keeper_order(path: Path, sizes: dict[Path, tuple[int, int]]) -> tuple:
    """Which copy stays: the most pixels, then the oldest file, then the shortest name."""
    width, height = sizes.get(path, (0, 0))
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return -width * height, mtime, len(path.name), path.name


def check_duplicates(probes: dict[Path, Probe], sizes: dict[Path, tuple[int, int]]) -> list[Finding]:
    """Exact copies (same bytes), then near copies (same picture re-encoded or resized) among what the exact
    check keeps; of each group the largest, then oldest, stays (``sizes``: the images' sizes as shown)."""
    findings = []
    if not near_check_available() and probes:
        findings.append(Finding("duplicate-near-unchecked", "info",
                                "Near duplicates were not looked for: the imagehash package is missing (pip install "
                                "imagehash; the WebUI's install.py adds it at the next start)."))
    exact = _duplicates("duplicate-exact", exact_groups(probes), sizes, "are byte-for-byte copies of another image")
    copies = set(exact.fix_targets) if exact else set()
    near = _duplicates("duplicate-near", near_groups({p: r for p, r in probes.items() if str(p) not in copies}),
                       sizes, "look the same as another image (re-encoded, resized or lightly edited copies)")
    return findings + [f for f in (exact, near) if f is not None]


def _duplicates(code: str, groups: list[list[Path]], sizes: dict[Path, tuple[int, int]], what: str) -> Finding | None:
    if not groups:
        return None
    files, notes, extra = [], {}, []
    for group in groups:
        group = sorted(group, key=lambda path: _keeper_order(path, sizes))
        keep = str(group[0])
        files.append(keep)
        notes[keep] = f"kept; {len(group) - 1} copy(ies)"
        for copy in group[1:]:
            files.append(str(copy))
            notes[str(copy)] = f"same as {Path(keep).name}"
            extra.append(str(copy))
    return Finding(code, "warning", f"{len(extra)} image(s) {what}: each copy trains the picture again, so the LoRA "
                   "overfits to it. Move the copies aside (the largest, then oldest, of each group stays).",
                   files, notes, fix="exclude", targets=extra)


def check_skipped(reading: Reading) -> list[Finding]:
    """Files and folders in the dataset that training never reads (so the user knows they do not count)."""
    findings = []
    if reading.ignored:
        kinds = sorted({p.suffix.lower() or p.name for p in reading.ignored})
        findings.append(Finding(
            "files-ignored", "info",
            f"{len(reading.ignored)} file(s) are not images training reads ({', '.join(kinds[:8])}): convert them to "
            "PNG or JPEG to train on them.", [str(p) for p in reading.ignored]))
    if reading.skipped_folders:
        findings.append(Finding(
            "folders-ignored", "info",
            f"{len(reading.skipped_folders)} subfolder(s) are skipped: training reads only the folder's own images "
            "and kohya-style N_name subfolders (N = repeats). Rename a folder to e.g. 10_name to train on it.",
            [str(p) for p in reading.skipped_folders]))
    return findings
