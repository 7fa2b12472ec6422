"""Dataset scanning: repeats, captions, EXIF, transparency, buckets, and one report for every bad image."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import dataset as data
from lora_train.engine.data.dataset import DatasetError


def cfg_for(path, **kw) -> TrainConfig:
    return TrainConfig(train_data_dir=str(path), resolution="64", min_bucket_reso=32, max_bucket_reso=128,
                       bucket_reso_steps=32, **kw)


def image(path, size=(64, 64), color="red", mode="RGB", caption: str | None = "a thing"):
    Image.new(mode, size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_repeat_folders_and_root_images(tmp_path):
    (tmp_path / "5_cat").mkdir()
    (tmp_path / "notes").mkdir()  # not N_name: ignored as in kohya
    image(tmp_path / "5_cat" / "a.png")
    image(tmp_path / "5_cat" / "b.jpg")
    image(tmp_path / "c.png")
    ds = data.scan(cfg_for(tmp_path))
    assert ds.num_train_images == 5 + 5 + 1
    assert ds.dataset_dirs()["5_cat"] == {"n_repeats": 5, "img_count": 2}
    batches = data.epoch_batches(ds, 2, seed=1, epoch=0)
    seen = [ds.items[i].path.name for batch in batches for i in batch]
    assert {name: seen.count(name) for name in seen} == {"a.png": 5, "b.jpg": 5, "c.png": 1}


def test_metadata_csv_and_trigger_word(tmp_path):
    image(tmp_path / "a.png", caption=None)
    image(tmp_path / "b.png", caption=None)
    meta = tmp_path / "meta.csv"
    with open(meta, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "prompt"])
        writer.writerow(["a.png", 'a "quoted", caption'])
        writer.writerow(["b.png", "zzz, b caption"])
    ds = data.scan(cfg_for(tmp_path, metadata_path=str(meta), trigger_word="zzz"))
    captions = {item.path.name: item.caption for item in ds.items}
    assert captions == {"a.png": 'zzz, a "quoted", caption', "b.png": "zzz, b caption"}


def test_every_bad_image_reported_in_one_error(tmp_path):
    image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.txt").write_text("x")
    image(tmp_path / "nocap1.png", caption=None)
    image(tmp_path / "nocap2.webp", caption=None)
    with pytest.raises(DatasetError) as err:
        data.scan(cfg_for(tmp_path))
    message = str(err.value)
    for name in ("broken.png", "nocap1.png", "nocap2.webp"):
        assert name in message
    assert "good.png" not in message
    assert "lora_train caption" in message


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="train_data_dir"):
        data.scan(cfg_for(tmp_path / "missing"))


def test_exif_orientation_and_transparency(tmp_path):
    rotated = Image.new("RGB", (96, 48), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90°: displayed as 48 wide, 96 high
    rotated.save(tmp_path / "rot.jpg", exif=exif)
    (tmp_path / "rot.txt").write_text("rotated")
    transparent = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    transparent.save(tmp_path / "alpha.png")
    (tmp_path / "alpha.txt").write_text("transparent")
    ds = data.scan(cfg_for(tmp_path))
    items = {item.path.name: item for item in ds.items}
    assert items["rot.jpg"].size == (48, 96)
    assert items["rot.jpg"].bucket[1] > items["rot.jpg"].bucket[0]  # portrait bucket
    pixels, _ = data.load_pixels(items["alpha.png"])
    assert torch.allclose(pixels, torch.ones_like(pixels), atol=1e-6)  # flattened onto white


def test_buckets_respect_area_and_grid():
    buckets = data.make_buckets(512 * 512, 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets
    for width, height in buckets:
        assert width * height <= 512 * 512
        assert width % 64 == 0 and height % 64 == 0


def test_caption_shuffle_keeps_leading_tokens():
    import random

    cfg = TrainConfig(shuffle_caption=True, keep_tokens=1)
    rng = random.Random(0)
    seen = {data.process_caption("trig, a, b, c, d, e", cfg, rng) for _ in range(20)}
    assert len(seen) > 1
    assert all(s.startswith("trig, ") for s in seen)
    assert data.process_caption("x, y", TrainConfig(caption_dropout_rate=1.0), rng) == ""


def test_caption_extension_without_its_dot(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("a red thing")
    ds = data.scan(cfg_for(tmp_path, caption_extension="caption"))
    assert [item.caption for item in ds.items] == ["a red thing"]


def test_non_utf8_caption_is_named_with_the_fix(tmp_path):
    image(tmp_path / "good.png")
    image(tmp_path / "latin.png", caption=None)
    (tmp_path / "latin.txt").write_bytes("tête".encode("latin-1"))
    with pytest.raises(DatasetError) as err:
        data.scan(cfg_for(tmp_path))
    message = str(err.value)
    assert f"{tmp_path / 'latin.txt'} is not UTF-8 text" in message and "re-save it as UTF-8" in message
    assert "without a caption" not in message


def test_metadata_rows_naming_missing_images_are_reported(tmp_path):
    image(tmp_path / "a.png", caption=None)
    meta = tmp_path / "metadata.csv"
    meta.write_text("filename,prompt\na.png,a thing\ngone.png,deleted image\n")
    with pytest.raises(DatasetError, match=r"metadata\.csv names 1 image\(s\) that are not in the training "
                                           r"folders: gone\.png"):
        data.scan(cfg_for(tmp_path, metadata_path=str(meta)))


@pytest.mark.parametrize(("name", "mode"), [("a.bmp", "RGB"), ("a.gif", "P"), ("a.tif", "RGB"), ("a.tiff", "RGBA")])
def test_every_image_type_the_captioner_lists_is_trained(tmp_path, name, mode):
    from lora_train.engine.data import caption_store

    image(tmp_path / name, size=(96, 64), color="blue", mode=mode)
    assert [p.name for p in caption_store.list_images(tmp_path)] == [name]  # what the tab and captioner see
    ds = data.scan(cfg_for(tmp_path))
    assert [item.path.name for item in ds.items] == [name]
    pixels, _ = data.load_pixels(ds.items[0])
    width, height = ds.items[0].bucket
    assert pixels.shape == (3, height, width)
    assert pixels[2].mean() > 0.9 and pixels[0].mean() < -0.9  # blue survives the decode
