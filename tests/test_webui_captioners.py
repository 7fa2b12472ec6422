"""The WebUI's own captioners (BLIP via shared.interrogator, DeepBooru via modules.deepbooru.model) over stand-ins
that follow the WebUI v1.10.1 interfaces (modules/interrogate.py, modules/deepbooru.py), through the caption store
and through the tab's handlers."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_train.caption import choices, loaded
from lora_train.caption.choices import CaptionSources
from lora_train.caption.errors import CaptionerError
from lora_train.caption.options import CaptionOptions
from lora_train.caption.run import caption_images
from lora_train.caption.webui_interrogators import WebUIBlip, WebUIDeepBooru
from lora_train.engine.data import caption_store
from lora_train.webui.jobs import JobRunner
from lora_train.webui.paths import PathPolicy

gr = pytest.importorskip("gradio")

from lora_train.webui import ui, ui_caption  # noqa: E402
from lora_train.webui.diffusers_host import DiffusersHost  # noqa: E402


class Interrogator:
    """InterrogateModels: interrogate() loads BLIP+CLIP onto the GPU, captions, then unload()s them to the CPU."""

    def __init__(self, fail: bool = False) -> None:
        self.device, self.modes, self.fail = "cpu", [], fail

    def interrogate(self, pil_image: Image.Image) -> str:
        self.device = "cuda"
        self.modes.append(pil_image.mode)
        res = "a blue square on a table, by an artist, flat colors" + (", <error>" if self.fail else "")
        self.unload()
        return res

    def unload(self) -> None:
        self.device = "cpu"


class DeepDanbooru:
    """deepbooru.model: start() loads onto the GPU, tag_multi() tags, stop() sends it back (settings permitting)."""

    def __init__(self) -> None:
        self.device, self.calls, self.offline = "cpu", [], False

    def start(self) -> None:
        if self.offline:  # the WebUI's load(): the download failed, modelloader found no file
            raise IndexError("list index out of range")
        self.device = "cuda"

    def stop(self) -> None:
        self.device = "cpu"

    def tag_multi(self, pil_image: Image.Image, force_disable_ranks: bool = False) -> str:
        assert self.device == "cuda", "tag_multi before start()"
        self.calls.append(pil_image.mode)
        return "1girl, long hair" if force_disable_ranks else "(1girl:0.990), (long hair:0.870)"


def images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGBA", (32, 32), (0, 0, 255, 128)).save(folder / f"img{index}.png")
    return folder


def test_blip_writes_trigger_first_and_keeps_existing(tmp_path):
    folder = images(tmp_path / "data")
    (folder / "img0.txt").write_text("hand written")
    blip = Interrogator()
    report = caption_images(folder, WebUIBlip(blip), CaptionOptions(trigger="sks"), mode="sidecar", progress=False)
    assert report.kept == ["img0.png"] and sorted(report.written) == ["img1.png", "img2.png"]
    assert caption_store.read_sidecar(folder / "img1.png") == "sks, a blue square on a table, by an artist, flat colors"
    assert caption_store.read_sidecar(folder / "img0.png") == "hand written"
    assert set(blip.modes) == {"RGB"} and blip.device == "cpu"  # as Extras > Caption hands it images


def test_deepbooru_never_writes_scores_and_goes_back_to_the_cpu(tmp_path):
    folder = images(tmp_path / "data")
    booru = DeepDanbooru()
    caption_images(folder, WebUIDeepBooru(booru), CaptionOptions(trigger="1girl"), mode="csv", batch_size=2,
                   progress=False)
    table = caption_store.read_metadata_csv(folder / "metadata.csv")
    assert set(table.values()) == {"1girl, long hair"}  # the trigger is not repeated, no "(tag:0.99)"
    assert len(booru.calls) == 3 and booru.device == "cpu"


def test_blip_error_stops_with_a_message_and_writes_nothing(tmp_path):
    folder = images(tmp_path / "data")
    with pytest.raises(CaptionerError, match="BLIP interrogator failed"):
        caption_images(folder, WebUIBlip(Interrogator(fail=True)), mode="csv", progress=False)
    assert not (folder / "metadata.csv").exists()


def test_default_is_the_first_that_runs_without_the_user_doing_anything():
    webui = CaptionSources(interrogator=Interrogator(), deepbooru=DeepDanbooru())
    assert choices.names(webui) == [choices.BLIP, choices.DEEPBOORU, choices.WD14, choices.COCA]
    assert choices.default_choice(webui) == choices.BLIP
    assert choices.names(CaptionSources()) == [choices.WD14, choices.COCA]
    assert choices.default_choice(CaptionSources()) == choices.COCA  # it downloads its weights on first use


@pytest.fixture
def tab(tmp_path):
    """The tab as the WebUI builds it, with the stand-ins handed in and downloads turned off."""
    runner = JobRunner(DiffusersHost(), PathPolicy(output_root=tmp_path / "out"))
    blip, booru = Interrogator(), DeepDanbooru()
    sources = CaptionSources(interrogator=blip, deepbooru=booru, models_dir=tmp_path / "models", allow_download=False)
    settings = ui.UISettings(datasets_root=tmp_path / "datasets", caption_sources=lambda: sources)
    demo = ui.build_ui(runner, settings)
    yield demo, blip, booru
    loaded.unload()


def _fns(demo) -> dict:
    functions = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    return {f.fn.__name__: f.fn for f in functions if getattr(f, "fn", None)}


def _dropdown(demo):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "lora_train_captioner")


def test_tab_offers_every_captioner_and_blip_captions_the_folder(tab, tmp_path):
    demo, blip, _ = tab
    dropdown = _dropdown(demo)
    offered = [c[0] if isinstance(c, (list, tuple)) else c for c in dropdown.choices]
    assert offered == [choices.BLIP, choices.DEEPBOORU, choices.WD14, choices.COCA] and dropdown.value == choices.BLIP
    folder = images(tmp_path / "data", 2)
    preview, status = _fns(demo)["preview"](str(folder), "sks", choices.BLIP, 0.35)
    assert preview.startswith("img0.png: sks, a blue square") and status == ""
    assert not (folder / "metadata.csv").exists() and not list(folder.glob("*.txt"))  # a preview writes nothing
    *_, message = _fns(demo)["caption"](str(folder), "sks", choices.DEEPBOORU, 0.35, False)
    assert message == "Captioned 2 image(s), kept 0."
    assert {row.name: row.caption for row in caption_store.list_rows(folder)}["img1.png"] == "sks, 1girl, long hair"


def test_tab_offline_says_what_each_captioner_needs_and_writes_nothing(tab, tmp_path):
    demo, blip, booru = tab
    folder = images(tmp_path / "data", 1)
    for name in (choices.WD14, choices.COCA):
        *_, message = _fns(demo)["caption"](str(folder), "", name, 0.35, False)
        assert ui_caption.DOWNLOADS_SETTING in message and "Captioners: BLIP and DeepBooru" in message
        assert "--" not in message and "Traceback" not in message  # no CLI flags in the tab
    blip.fail = True  # the WebUI's BLIP offline: its interrogate() returns "<error>" instead of raising
    *_, message = _fns(demo)["caption"](str(folder), "", choices.BLIP, 0.35, False)
    assert "BLIP interrogator failed" in message and "Captioners: BLIP and DeepBooru" in message
    booru.offline = True
    *_, message = _fns(demo)["caption"](str(folder), "", choices.DEEPBOORU, 0.35, False)
    assert "DeepBooru could not load its model" in message and "Captioners: BLIP and DeepBooru" in message
    assert [p.name for p in folder.iterdir()] == ["img0.png"]
    assert not [p for p in (tmp_path / "models").rglob("*") if p.is_file()]  # no partial download


def test_stop_keeps_what_was_captioned(tmp_path):
    runner = JobRunner(DiffusersHost(), PathPolicy(output_root=tmp_path / "out"))
    run = ui_caption.CaptionRun(runner, lambda: CaptionSources(interrogator=Interrogator()))
    folder = images(tmp_path / "data", 12)
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        run.stop.set()  # the user clicks Stop after the first batch

    try:
        message = run.caption(folder, choices.BLIP, 0.35, "", False, progress)
    finally:
        loaded.unload()
    assert message == "Stopped. Captioned 8 image(s), kept 0." and seen == [(8, 12)]
    assert sum(1 for row in caption_store.list_rows(folder) if row.caption) == 8
