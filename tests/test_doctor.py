"""The dataset doctor: every finding from images and captions made here, the fixes (what moved where, nothing
deleted, clean afterwards), the probe cache, and training refusing what the doctor calls an error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_train.engine import preflight
from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import dataset as data
from lora_train.engine.data import doctor
from lora_train.engine.data.doctor import fixes, probe
from lora_train.engine.data.doctor.probe import ProbeCache


def cfg_for(path: Path, **kw) -> TrainConfig:
    values = dict(train_data_dir=str(path), resolution="64", min_bucket_reso=32, max_bucket_reso=128,
                  bucket_reso_steps=32)
    values.update(kw)
    return TrainConfig(**values)


def picture(seed: int, size=(96, 96)) -> Image.Image:
    """A smooth random picture: its own perceptual hash (solid colours would all hash alike)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)


def add(folder: Path, name: str, image: Image.Image | None = None, caption: str | None = "a thing", **save) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    (image if image is not None else picture(hash(name) % 10_000)).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def clean(folder: Path, count: int = 6) -> list[Path]:
    return [add(folder, f"img{i}.png", picture(100 + i), caption=f"zz, thing {i}, detail {i}") for i in range(count)]


def examine(cfg: TrainConfig, **kw) -> doctor.Report:
    from lora_train.hosts.clip_tokenizer import caption_tokenizer

    return doctor.examine(cfg, caption_tokenizer(), cache=ProbeCache(), **kw)


def files(report: doctor.Report, code: str) -> set[str]:
    finding = report.get(code)
    assert finding is not None, f"no {code} in {report.codes()}"
    return {Path(f).name for f in finding.files}


def test_a_sound_dataset_has_only_notes(tmp_path):
    clean(tmp_path)
    report = examine(cfg_for(tmp_path, trigger_word="zz"))
    assert report.ok and report.of("warning") == [], report.text()
    assert {"run-length", "buckets"} <= set(report.codes())
    assert report.dataset is not None and len(report.dataset.items) == 6
    assert report.summary().startswith("dataset check: 6 images, 0 errors, 0 warnings")


def test_damaged_files_are_errors_and_training_refuses_them_with_the_same_sentence(tmp_path):
    clean(tmp_path)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "zero.txt").write_text("x")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "junk.txt").write_text("x")
    buffer = io.BytesIO()
    picture(7, (256, 256)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "cut.txt").write_text("x")
    cfg = cfg_for(tmp_path)
    report = examine(cfg)
    assert not report.ok and report.dataset is None
    assert files(report, "image-unreadable") == {"zero.png", "junk.png"}
    assert "empty file" in report.get("image-unreadable").notes[str(tmp_path / "zero.png")]
    assert files(report, "image-truncated") == {"cut.jpg"}
    with pytest.raises(data.DatasetError) as err:
        preflight.check(cfg, None)
    for finding in report.errors:
        assert finding.message in str(err.value)
    assert "cut.jpg" in str(err.value) and "img0.png" not in str(err.value)


def test_sizes_against_the_bucket(tmp_path):
    clean(tmp_path)
    add(tmp_path, "dot.png", Image.new("RGB", (1, 1), "red"))
    add(tmp_path, "tiny.png", picture(1, (6, 6)))  # bucket 64: a latent of 8 > 6 pixels
    add(tmp_path, "small.png", picture(2, (24, 24)))  # 2.7x upscale
    add(tmp_path, "banner.png", picture(3, (640, 64)))  # 10:1 -> the widest bucket (128x32) crops most of it
    report = examine(cfg_for(tmp_path))
    assert files(report, "image-too-small") == {"dot.png", "tiny.png"}
    assert report.get("image-too-small").fix == "exclude"
    assert files(report, "image-upscaled") == {"small.png"}
    assert "2.7x" in report.get("image-upscaled").notes[str(tmp_path / "small.png")]
    assert files(report, "image-cropped") == {"banner.png"}
    assert "60% cropped" in report.get("image-cropped").notes[str(tmp_path / "banner.png")]


def test_lying_extension_rotation_transparency_and_modes(tmp_path):
    clean(tmp_path)
    add(tmp_path, "liar.png", picture(11), format="JPEG")
    rotated = picture(12, (96, 48))
    exif = rotated.getexif()
    exif[0x0112] = 6
    add(tmp_path, "rot.jpg", rotated, exif=exif)
    holes = np.array(picture(13).convert("RGBA"))
    holes[:20, :20, 3] = 0
    add(tmp_path, "holes.png", Image.fromarray(holes))
    add(tmp_path, "opaque.png", picture(14).convert("RGBA"))  # an alpha channel, all opaque: nothing to say
    add(tmp_path, "cmyk.jpg", picture(15).convert("CMYK"))
    add(tmp_path, "grey16.png", Image.fromarray((np.arange(96 * 96).reshape(96, 96) * 7).astype(np.uint16)))
    report = examine(cfg_for(tmp_path))
    assert report.get("image-extension").notes == {str(tmp_path / "liar.png"): ".png file holding JPEG"}
    assert files(report, "image-rotated") == {"rot.jpg"}
    assert files(report, "image-transparent") == {"holes.png"}
    assert "white" in report.get("image-transparent").message
    assert files(report, "image-cmyk") == {"cmyk.jpg"}
    assert files(report, "image-mode") == {"grey16.png"}
    assert report.ok  # all of these train
    masked = examine(cfg_for(tmp_path, alpha_mask=True)).get("image-transparent")
    assert masked.severity == "info" and "alpha_mask" in masked.message  # transparent parts add no loss then


def test_loader_trains_the_image_as_shown_and_16_bit_grey_is_not_clipped(tmp_path):
    """What the notes above promise: EXIF rotation applied, 16-bit grey scaled to 8 bits (Pillow's own convert
    clips it to white)."""
    half = np.zeros((32, 64, 3), np.uint8)
    half[:, :32] = (255, 0, 0)  # stored: red left, blue right
    half[:, 32:] = (0, 0, 255)
    stored = Image.fromarray(half)
    exif = stored.getexif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: red on top
    add(tmp_path, "rot.png", stored, exif=exif)
    grey = (np.full((64, 64), 32768)).astype(np.uint16)  # mid grey in 16 bits
    add(tmp_path, "grey.png", Image.fromarray(grey))
    items = {item.path.name: item for item in data.scan(cfg_for(tmp_path, enable_bucket=False)).items}
    pixels, _ = data.load_pixels(items["rot.png"])
    top, bottom = pixels[:, :8].mean(dim=(1, 2)), pixels[:, -8:].mean(dim=(1, 2))
    assert top[0] > 0.9 and top[2] < -0.9 and bottom[2] > 0.9 and bottom[0] < -0.9
    grey_pixels, _ = data.load_pixels(items["grey.png"])
    assert abs(float(grey_pixels.mean())) < 0.05  # mid grey, not white (1.0)


def test_exact_and_near_duplicates(tmp_path):
    clean(tmp_path)
    original = add(tmp_path, "cat.png", picture(21, (256, 192)))
    (tmp_path / "cat-copy.png").write_bytes(original.read_bytes())
    (tmp_path / "cat-copy.txt").write_text("copy")
    add(tmp_path, "cat-small.jpg", picture(21, (256, 192)).resize((128, 96)), quality=60)  # re-encoded, resized
    add(tmp_path, "red.png", Image.new("RGB", (64, 64), "red"))  # solid colours have no structure to compare
    add(tmp_path, "blue.png", Image.new("RGB", (64, 64), "blue"))
    report = examine(cfg_for(tmp_path))
    exact = report.get("duplicate-exact")
    assert {Path(f).name for f in exact.files} == {"cat.png", "cat-copy.png"}
    assert [Path(f).name for f in exact.fix_targets] == ["cat-copy.png"]  # the older file stays
    assert [Path(f).name for f in report.get("duplicate-near").fix_targets] == ["cat-small.jpg"]  # the larger stays
    near = report.get("duplicate-near")
    assert {"cat-small.jpg"} <= {Path(f).name for f in near.fix_targets}
    assert not {"red.png", "blue.png"} & {Path(f).name for f in near.files}
    assert not {f"img{i}.png" for i in range(6)} & {Path(f).name for f in near.files + exact.files}


def test_missing_empty_and_undecodable_captions(tmp_path):
    clean(tmp_path)
    add(tmp_path, "nocap.png", caption=None)
    add(tmp_path, "empty.png", caption="")
    add(tmp_path, "only-trigger.png", caption="zz")
    add(tmp_path, "latin.png", caption=None)
    (tmp_path / "latin.txt").write_bytes("tête".encode("latin-1"))
    report = examine(cfg_for(tmp_path, trigger_word="zz"))
    assert files(report, "caption-missing") == {"nocap.png"} and report.get("caption-missing").fix == "caption"
    assert files(report, "caption-not-utf8") == {"latin.png"}
    assert files(report, "caption-empty") == {"empty.png", "only-trigger.png"}


def test_caption_too_long_is_counted_with_the_text_encoders_tokenizer(tmp_path):
    """The count is the CLIP BPE's: checked against open_clip's own tokenizer (SD2/SDXL's), and the note says
    where the encoder cuts: at max_token_length 75 the WebUI's chunking (which training uses) ends the chunk after
    the last comma when that comma is within 20 tokens of the end, so the first tag not read whole is dropped."""
    open_clip = pytest.importorskip("open_clip")
    clean(tmp_path)
    long_caption = ", ".join(f"tag{i} very big red word" for i in range(18)) + ", the very end"
    add(tmp_path, "long.png", caption=long_caption)
    report = examine(cfg_for(tmp_path))
    note = report.get("caption-too-long").notes[str(tmp_path / "long.png")]
    encode = open_clip.tokenizer.SimpleTokenizer().encode
    tokens = encode(long_caption)
    assert note.startswith(f"{len(tokens)} tokens;") and 75 < len(tokens) <= 150
    last_comma = max(i for i, t in enumerate(tokens[:75]) if t == encode(",")[0])
    kept = last_comma + 1 if 75 - last_comma <= 20 else 75
    assert kept < 75  # the caption is made so that the comma rule moves the cut
    words = long_caption.split()
    first_cut = next(i for i in range(len(words)) if len(encode(" ".join(words[: i + 1]))) > kept)
    assert f"cut from '{' '.join(words[first_cut:])[:30]}" in note
    assert files(report, "caption-too-long") == {"long.png"}
    # two chunks read the whole caption: nothing is cut, nothing to say
    assert report.get("caption-too-long") is not None
    assert examine(cfg_for(tmp_path, max_token_length=150)).get("caption-too-long") is None


def test_trigger_word_findings(tmp_path):
    clean(tmp_path)
    add(tmp_path, "late.png", caption="a thing, zz")
    add(tmp_path, "none.png", caption="another thing")
    with_trigger = examine(cfg_for(tmp_path, trigger_word="zz"))
    assert files(with_trigger, "trigger-not-first") == {"late.png", "none.png"}
    assert with_trigger.get("trigger-not-first").severity == "info"  # training puts it first anyway
    inferred = examine(cfg_for(tmp_path))
    finding = inferred.get("trigger-inconsistent")
    assert finding.severity == "warning" and finding.data["trigger"] == "zz"
    assert files(inferred, "trigger-inconsistent") == {"late.png", "none.png"}


def test_same_caption_everywhere_and_repeated_tags(tmp_path):
    for i in range(4):
        add(tmp_path, f"s{i}.png", picture(40 + i), caption="zz, girl, smile, girl")
    report = examine(cfg_for(tmp_path, trigger_word="zz"))
    assert len(report.get("caption-all-same").files) == 4
    assert report.get("caption-repeated-tags").notes[str(tmp_path / "s0.png")] == "repeated: girl"


def test_run_numbers_buckets_and_few_images(tmp_path):
    folder = tmp_path / "3_thing"
    for i in range(4):
        add(folder, f"sq{i}.png", picture(50 + i, (64, 64)), caption=f"zz, sq {i}")
    add(folder, "tall.png", picture(60, (32, 96)), caption="zz, tall")
    cfg = cfg_for(tmp_path, batch_size=4, epochs=3, trigger_word="zz")
    report = examine(cfg, preset="Character")
    stats = report.stats
    # 4 squares x 3 repeats = 12 samples: 3 batches of 4; the tall one x 3 = 3 samples: 1 short batch
    assert stats["batches_per_epoch"] == 4 and stats["steps"] == 12 and stats["train_samples_per_epoch"] == 15
    assert files(report, "bucket-below-batch") == {"tall.png"}
    assert "12 step(s) (epochs 3)" in report.get("run-length").message
    assert "Character" in report.get("few-images").message
    assert report.ok


def test_validation_split_names_the_held_out_images_and_the_run_counts_only_the_rest(tmp_path):
    """validation_split 0.5 of 6 images holds 3 out: the doctor names those 3 (the same 3 on every call with the
    seed) and counts steps over the 3 that train, as the trainer does (3 samples x 2 epochs at batch 1 = 6)."""
    clean(tmp_path / "1_thing", count=6)
    cfg = cfg_for(tmp_path, validation_split=0.5, validation_seed=7, epochs=2)
    report = examine(cfg)
    held = files(report, "validation-held-out")
    assert len(held) == 3 and held == files(examine(cfg), "validation-held-out")
    assert "validation_split 0.5" in report.get("validation-held-out").message
    assert report.stats["train_images"] == 3 and report.stats["steps"] == 6
    assert examine(cfg_for(tmp_path, epochs=2)).get("validation-held-out") is None


def test_regularisation_images_outweighing_training_images(tmp_path):
    clean(tmp_path / "1_thing", count=5)
    for i in range(3):
        add(tmp_path / "reg" / "10_person", f"r{i}.png", picture(70 + i), caption=None)
    report = examine(cfg_for(tmp_path, reg_data_dir=str(tmp_path / "reg")))
    assert report.get("reg-outweighs").severity == "warning"
    assert "30 samples per epoch against 5" in report.get("reg-outweighs").message


def test_files_and_folders_training_skips(tmp_path):
    clean(tmp_path)
    (tmp_path / "photo.heic").write_bytes(b"heic")
    (tmp_path / "cats").mkdir()
    (tmp_path / "_excluded").mkdir()  # ours: never reported
    report = examine(cfg_for(tmp_path))
    assert files(report, "files-ignored") == {"photo.heic"}
    assert files(report, "folders-ignored") == {"cats"}


def test_missing_folder_is_one_error(tmp_path):
    report = examine(cfg_for(tmp_path / "nowhere"))
    assert report.codes() == ["dataset-unreadable"] and "is not a folder" in report.errors[0].message


# ---------------------------------------------------------------------------------------------- fixes


def snapshot(root: Path) -> list[bytes]:
    """Every file's bytes (names change when moved aside; contents must all survive)."""
    return sorted(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_moving_aside_loses_nothing_and_leaves_the_doctor_clean(tmp_path):
    clean(tmp_path)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "zero.txt").write_text("zero caption")
    add(tmp_path, "dot.png", Image.new("RGB", (1, 1)), caption="a dot")
    original = tmp_path / "img0.png"
    (tmp_path / "img0-copy.png").write_bytes(original.read_bytes())
    (tmp_path / "img0-copy.txt").write_text("the copy")
    (tmp_path / "_excluded").mkdir()
    (tmp_path / "_excluded" / "dot.png").write_bytes(b"an earlier exclusion")  # never overwritten
    before = snapshot(tmp_path)
    cfg = cfg_for(tmp_path, trigger_word="zz")
    report = examine(cfg)
    result = fixes.apply(report, cfg, "exclude")
    excluded = tmp_path / "_excluded"
    assert sorted(p.name for p in excluded.iterdir()) == ["dot-2.png", "dot-2.txt", "dot.png", "img0-copy.png",
                                                          "img0-copy.txt", "zero.png", "zero.txt"]
    assert (excluded / "dot.png").read_bytes() == b"an earlier exclusion"
    assert snapshot(tmp_path) == before  # every byte still there
    assert len(result.moved) == 6 and "moved 3 image(s)" in result.summary().lower()
    after = examine(cfg)
    assert after.ok and not {"duplicate-exact", "image-too-small", "image-unreadable"} & set(after.codes())


def test_moving_aside_takes_the_metadata_row_along(tmp_path):
    clean(tmp_path)
    for path in tmp_path.glob("*.txt"):
        path.unlink()
    (tmp_path / "dot.png").write_bytes(b"")
    rows = {f"img{i}.png": f"zz, thing {i}" for i in range(6)} | {"dot.png": "a dot"}
    csv_path = tmp_path / "metadata.csv"
    csv_path.write_text("filename,prompt\n" + "".join(f'{k},"{v}"\n' for k, v in rows.items()))
    cfg = cfg_for(tmp_path, metadata_path=str(csv_path))
    fixes.apply(examine(cfg), cfg, "exclude")
    from lora_train.engine.data.caption_store import read_metadata_csv

    assert "dot.png" not in read_metadata_csv(csv_path)
    assert read_metadata_csv(tmp_path / "_excluded" / "metadata.csv") == {"dot.png": "a dot"}
    assert examine(cfg).ok  # no row left naming a missing image


def test_trigger_and_tag_fixes_rewrite_captions_in_place(tmp_path):
    clean(tmp_path)
    add(tmp_path, "late.png", caption="a thing, ZZ, a thing")
    add(tmp_path, "empty.png", caption="")
    cfg = cfg_for(tmp_path, trigger_word="zz")
    fixes.apply(examine(cfg), cfg, "trigger")
    assert (tmp_path / "late.txt").read_text().strip() == "zz, a thing, a thing"
    assert (tmp_path / "empty.txt").read_text() == ""  # left for the caption fix
    fixes.apply(examine(cfg), cfg, "tags")
    assert (tmp_path / "late.txt").read_text().strip() == "zz, a thing"
    after = examine(cfg)
    assert not {"trigger-not-first", "caption-repeated-tags"} & set(after.codes())


def test_fixes_touch_only_the_datasets_images(tmp_path):
    clean(tmp_path / "data")
    outside = add(tmp_path, "elsewhere.png")
    with pytest.raises(fixes.FixError, match="not an image of this dataset"):
        fixes.move_aside(cfg_for(tmp_path / "data"), [outside])
    assert outside.is_file()


# ---------------------------------------------------------------------------------------------- speed


def test_pixels_are_read_once_per_file_version(tmp_path, monkeypatch):
    paths = clean(tmp_path)
    calls: list[Path] = []
    real = probe.probe
    monkeypatch.setattr(probe, "probe", lambda path: calls.append(Path(path)) or real(path))
    cache_file = tmp_path.parent / "probes.json"
    cache = ProbeCache(cache_file)
    cfg = cfg_for(tmp_path)
    doctor.examine(cfg, cache=cache)
    assert len(calls) == 6
    doctor.examine(cfg, cache=cache)
    assert len(calls) == 6  # nothing changed: nothing read
    picture(999).save(paths[0])  # a new version of one file
    doctor.examine(cfg, cache=ProbeCache(cache_file))  # and the cache survives in its file
    assert calls[6:] == [paths[0]]
    saved = json.loads(cache_file.read_text())
    assert len(saved["entries"]) == 6


def test_report_is_plain_data_for_the_api_and_json(tmp_path):
    clean(tmp_path)
    (tmp_path / "zero.png").write_bytes(b"")
    report = examine(cfg_for(tmp_path))
    body = json.loads(json.dumps(report.to_dict()))
    assert body["ok"] is False and body["counts"]["error"] == 1
    finding = next(f for f in body["findings"] if f["code"] == "image-unreadable")
    assert finding["files"][0]["path"] == str(tmp_path / "zero.png") and finding["fix"] == "exclude"


def test_metadata_rows_naming_no_image_and_a_balanced_reg_folder(tmp_path):
    clean(tmp_path / "data")
    csv_path = tmp_path / "data" / "metadata.csv"
    rows = "".join(f'img{i}.png,"zz, thing {i}"\n' for i in range(6))
    csv_path.write_text("filename,prompt\n" + rows + "gone.png,a deleted image\n")
    add(tmp_path / "reg" / "1_person", "r0.png", picture(80), caption=None)
    report = examine(cfg_for(tmp_path / "data", metadata_path=str(csv_path), reg_data_dir=str(tmp_path / "reg")))
    assert "gone.png" in report.get("metadata-rows-unused").message and not report.ok
    assert report.get("reg-images").message.startswith("1 regularisation image(s), 1 samples per epoch against 6")


def test_without_a_tokenizer_the_report_says_lengths_were_not_counted(tmp_path):
    clean(tmp_path)
    report = doctor.examine(cfg_for(tmp_path), None, cache=ProbeCache())
    assert report.get("caption-length-unchecked").severity == "info" and report.ok
