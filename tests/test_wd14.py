"""WD14 tagger on a tiny ONNX model with the real input/output shapes, loaded through onnxruntime as a user's."""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_onnx import logit, tagger_model

from lora_train.caption import cli as caption_cli
from lora_train.caption import wd14
from lora_train.caption.errors import CaptionerError, WeightsMissingError
from lora_train.caption.options import CaptionOptions
from lora_train.engine.data import caption_store

pytest.importorskip("onnxruntime")

# name, category, probability (blue_sky follows the image's blue channel instead)
TAGS = [("general", 9, 0.90), ("explicit", 9, 0.05), ("long_hair", 0, 0.80), ("^_^", 0, 0.50),
        ("hat_(cosplay)", 0, 0.40), ("faint_tag", 0, 0.20), ("hatsune_miku", 4, 0.90), ("somebody", 4, 0.60),
        ("blue_sky", 0, None)]


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.zeros((3, len(TAGS)), np.float32)
    bias = np.array([logit(p) if p is not None else -4.0 for _, _, p in TAGS], np.float32)
    weights[0, -1] = 8.0 / 255  # channel 0 of BGR input is blue: a blue image gets blue_sky, a red one does not
    (folder / wd14.MODEL_FILE).write_bytes(tagger_model(weights, bias))
    with open(folder / wd14.TAGS_FILE, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["tag_id", "name", "category", "count"])
        out.writerows([i, name, category, 100] for i, (name, category, _) in enumerate(TAGS))
    return folder


@pytest.fixture
def model_dir(tmp_path):
    return write_model(tmp_path / "wd14")


def blue() -> Image.Image:
    return Image.new("RGB", (40, 24), (0, 0, 255))


def red() -> Image.Image:
    return Image.new("RGB", (24, 40), (255, 0, 0))


def test_thresholds_order_and_replacements(model_dir):
    tagger = wd14.WD14Tagger.load(model_dir, allow_download=False)
    lines = tagger.describe([blue(), red()], CaptionOptions(trigger="sks"))
    # trigger, characters over their threshold, then general tags likeliest first; escaped parentheses, kaomoji kept
    assert lines[0] == "sks, hatsune miku, blue sky, long hair, ^_^, hat \\(cosplay\\)"
    assert lines[1] == "sks, hatsune miku, long hair, ^_^, hat \\(cosplay\\)"


def test_threshold_and_rating_options(model_dir):
    options = wd14.TagOptions(threshold=0.45, character_threshold=0.5, ratings=True, spaces=False, escape=False)
    tagger = wd14.WD14Tagger.load(model_dir, allow_download=False, options=options)
    assert tagger.describe([red()]) == ["general, hatsune_miku, somebody, long_hair, ^_^"]


def test_cli_writes_wd14_tags_and_keeps_existing(tmp_path, model_dir, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    blue().save(folder / "a.png")
    red().save(folder / "b.png")
    (folder / "b.txt").write_text("hand written")
    args = ["--input", folder, "--model", "wd14", "--weights", model_dir, "--sidecar", "--trigger", "sks",
            "--threshold", "0.6", "--no-progress"]
    parser = argparse.ArgumentParser()
    caption_cli.add_parser(parser.add_subparsers())
    assert caption_cli.run_caption(parser.parse_args(["caption", *map(str, args)])) == 0
    assert caption_store.read_sidecar(folder / "a.png") == "sks, hatsune miku, blue sky, long hair"
    assert caption_store.read_sidecar(folder / "b.png") == "hand written"
    assert "Captioned 1 image(s), kept 1" in capsys.readouterr().out


def test_offline_without_model_is_one_clear_message_and_leaves_nothing(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    blue().save(folder / "a.png")
    empty = tmp_path / "wd14"
    parser = argparse.ArgumentParser()
    caption_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["caption", "--input", str(folder), "--model", "wd14", "--weights", str(empty)])
    assert caption_cli.run_caption(args) == 2
    err = capsys.readouterr().err
    assert "model.onnx" in err and "huggingface.co/SmilingWolf/wd-vit-tagger-v3" in err and str(empty) in err
    assert "Traceback" not in err and "Captioners: " in err  # and what every captioner needs
    assert not (folder / "metadata.csv").exists()
    assert not empty.exists() or not any(p.is_file() for p in empty.rglob("*"))


def test_failed_download_removes_its_partial_file(tmp_path, monkeypatch):
    import huggingface_hub

    def half_download(repo_id, filename, local_dir=None, **kwargs):
        partial = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.incomplete"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"half")
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", half_download)
    with pytest.raises(WeightsMissingError) as caught:
        wd14.WD14Tagger.load(tmp_path / "wd14", allow_download=True)
    assert "could not be downloaded (connection reset by peer)" in str(caught.value)
    assert not list((tmp_path / "wd14").rglob("*.incomplete"))


def test_missing_onnxruntime_is_installed_through_the_hook_or_named(model_dir, monkeypatch):
    import onnxruntime

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(CaptionerError, match="pip install onnxruntime"):
        wd14.WD14Tagger.load(model_dir)
    asked = []

    def install(name):
        asked.append(name)
        monkeypatch.setitem(sys.modules, "onnxruntime", onnxruntime)

    assert wd14.WD14Tagger.load(model_dir, install=install).describe([red()])[0].startswith("hatsune miku")
    assert asked == ["onnxruntime"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CaptionerError, match="could not be installed: pip said no"):
        wd14.WD14Tagger.load(model_dir, install=lambda name: "pip said no")


def test_tags_file_that_does_not_match_the_model_is_named(model_dir):
    with open(model_dir / wd14.TAGS_FILE, "a", encoding="utf-8") as handle:
        handle.write("99,extra,0,1\n")
    with pytest.raises(CaptionerError, match="9 outputs but its selected_tags.csv lists 10 tags"):
        wd14.WD14Tagger.load(model_dir, allow_download=False)
