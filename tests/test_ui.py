"""The tab's Blocks build on the installed gradio, cover every config field, and their handlers work.

Handlers are called the way gradio calls them (the functions registered on the Blocks), without a browser;
tests/test_browser.py drives the real page.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import os
import re
import signal
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

gr = pytest.importorskip("gradio")

from lora_train.cli import describe  # noqa: E402
from lora_train.engine.config.settings import ConfigError, TrainConfig  # noqa: E402
from lora_train.webui import ui, ui_fields, ui_gradio, ui_status  # noqa: E402
from lora_train.webui.diffusers_host import DiffusersHost  # noqa: E402
from lora_train.webui.jobs import Job, JobRunner  # noqa: E402
from lora_train.webui.paths import PathPolicy  # noqa: E402
from lora_train.webui.presets import preset_values  # noqa: E402
from lora_train.webui.standalone import make_app  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


def _fns(demo) -> dict:
    functions = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    return {f.fn.__name__: f.fn for f in functions if getattr(f, "fn", None)}


def _elem_ids(demo) -> set[str]:
    return {getattr(block, "elem_id", None) for block in demo.blocks.values()} - {None}


def _component(demo, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


class Page:
    """One open page's live view, driven the way gradio drives it: Timer ticks carrying the page's state
    (gradio >= 4.40), or the async generator the page's load event starts (gradio 3)."""

    def __init__(self, demo):
        fns = _fns(demo)
        self.tick, self.sent = fns.get("tick"), None
        if self.tick is None:
            self.loop = asyncio.new_event_loop()
            self.watch = fns["watch"]()

    def poll(self) -> list:
        """(progress, loss plot, sample, log, result group, output path, snippet) as sent to the page."""
        if self.tick is not None:
            *updates, self.sent = self.tick(self.sent)
            return updates
        return self.loop.run_until_complete(self.watch.__anext__())

    def close(self) -> None:
        if self.tick is None:
            self.loop.run_until_complete(self.watch.aclose())
            self.loop.close()


def _value(update):
    """What an output shows after an update: gradio.update() dicts carry it under "value"."""
    return update.get("value", update) if isinstance(update, dict) else update


@pytest.fixture
def app(tmp_path: Path):
    args = argparse.Namespace(output_dir=str(tmp_path / "out"), allow_dir=[str(tmp_path)], base_model="tiny",
                              config=str(EXAMPLE), captioner_weights=None, no_download=False)
    demo, runner = make_app(args)
    yield demo, runner
    for job in runner.jobs.values():
        job.stop_event.set()
        job.done_event.wait(60)


def test_blocks_build_with_a_widget_for_every_config_field(app) -> None:
    demo, _ = app
    ids = _elem_ids(demo)
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"lora_train_cfg_{f.name}" not in ids]
    assert missing == []
    assert {"lora_train_train", "lora_train_stop", "lora_train_loss", "lora_train_snippet",
            "lora_train_captions", "lora_train_gallery", "lora_train_send"} <= ids
    send = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "lora_train_send")
    assert send.visible is False  # standalone: no txt2img to send to


def test_fields_show_human_labels_and_help_and_hide_what_the_host_decides(app, tmp_path: Path) -> None:
    standalone, _ = app

    class InWebUI(DiffusersHost):
        in_webui = True

    runner = JobRunner(InWebUI(), PathPolicy(output_root=tmp_path / "out"))
    webui = ui.build_ui(runner, ui.UISettings(datasets_root=tmp_path / "ds"))

    def field(demo, key):
        return _component(demo, f"lora_train_cfg_{key}")

    rank, alpha = field(webui, "lora_rank"), field(webui, "lora_alpha")
    assert (rank.label, alpha.label) == ("Rank (network_dim)", "Alpha (network_alpha)")
    assert "alpha / rank" in alpha.info and "Min-SNR" in field(webui, "min_snr_gamma").info
    assert "lora_train_cfg" not in field(webui, "learning_rate").label  # no snake_case keys as labels
    visible = {demo: {key: field(demo, key).visible for key in ("base_model", "device", "output_dir", "overwrite",
                                                                 "seed")} for demo in (standalone, webui)}
    # the WebUI trains its loaded checkpoint on its device; the tab itself decides where outputs go
    assert visible[webui] == {"base_model": False, "device": False, "output_dir": False, "overwrite": False,
                              "seed": True}
    assert visible[standalone] == {"base_model": True, "device": True, "output_dir": False, "overwrite": False,
                                   "seed": True}
    headings = [b.value for b in webui.blocks.values() if type(b).__name__ == "Markdown" and b.visible]
    assert [h for h in headings if h.startswith("####")] == [
        "#### Data", "#### Model and network", "#### Optimisation", "#### Noise and loss", "#### Output",
        "#### Samples", "#### Validation"]
    assert "alpha/rank" in _component(webui, "lora_train_preset").info  # why presets differ from the defaults


def test_network_type_choice_fills_the_kohya_keys_and_each_trains_that_type(app) -> None:
    demo, _ = app
    choice = _component(demo, "lora_train_network_type")
    assert list(ui_fields.NETWORK_TYPES) == ["LoRA", "LoCon", "LoHa", "LoKr", "DoRA"] and choice.value == "LoRA"
    values = dict(zip(ui_fields.FIELD_NAMES, ui_fields.config_to_values(TrainConfig()), strict=True))
    for name in ui_fields.NETWORK_TYPES:
        updates = _fns(demo)["network_type_updates"](name)
        for key, update in zip(ui_fields.NETWORK_KEYS, updates, strict=True):
            if not (isinstance(update, dict) and "value" not in update):  # gr.update(): the widget keeps its value
                values[key] = _value(update)
        cfg = TrainConfig(**ui_fields.values_to_config(list(values.values())))
        assert cfg.network.name == name and ui_fields.network_type_of(cfg.to_dict()) == name


NOISE_AND_LOSS_KEYS = ("noise_offset", "noise_offset_random_strength", "adaptive_noise_scale",
                       "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
                       "ip_noise_gamma_random_strength", "min_timestep", "max_timestep", "loss_type", "huber_schedule",
                       "huber_c", "huber_scale", "min_snr_gamma", "debiased_estimation_loss", "masked_loss",
                       "alpha_mask", "conditioning_data_dir")


def test_kohyas_noise_and_loss_keys_are_in_advanced_with_when_to_use_them(app, dataset_dir: Path) -> None:
    demo, runner = app
    fields = {key: _component(demo, f"lora_train_cfg_{key}") for key in NOISE_AND_LOSS_KEYS}
    assert all(f.visible for f in fields.values())
    assert type(fields["loss_type"]).__name__ == "Dropdown" and type(fields["masked_loss"]).__name__ == "Checkbox"
    assert list(_choices(fields["loss_type"])) == ["l2", "l1", "huber", "smooth_l1"]
    assert list(_choices(fields["huber_schedule"])) == ["constant", "exponential", "snr"]
    assert "overfitting" in fields["ip_noise_gamma"].info and "detail" in fields["max_timestep"].info
    assert "transparent" in fields["alpha_mask"].info and "outliers" in fields["loss_type"].info
    blocks = list(demo.blocks.values())  # the heading comes right before the group's first widget
    heading = next(i for i, b in enumerate(blocks) if getattr(b, "value", None) == "#### Noise and loss")
    assert all(blocks.index(f) > heading for f in fields.values())
    # a masked run with kohya's loss options, started from the tab
    from PIL import Image

    with Image.open(dataset_dir / "00_red_circle.png") as image:
        rgba = image.convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    alpha.paste(255, (rgba.width // 2, 0, rgba.width, rgba.height))  # the right half trains
    rgba.putalpha(alpha)
    rgba.save(dataset_dir / "00_red_circle.png")
    values = _small_run(dataset_dir, sample_every_n_steps=0, masked_loss=True, alpha_mask=True, loss_type="huber",
                        multires_noise_iterations=4, ip_noise_gamma=0.1, debiased_estimation_loss=True,
                        min_timestep=50, max_timestep=950)
    progress, message, *_ = _fns(demo)["start"](*values)
    job = runner.current
    assert job.done_event.wait(120) and job.error is None, (message, job.error)
    from lora_train.engine.output.export import read_lora

    _, meta = read_lora(job.output)
    assert (meta["ss_alpha_mask"], meta["ss_loss_type"], meta["modelspec.timestep_range"]) == ("True", "huber",
                                                                                               "50,950")


def _choices(dropdown) -> list:
    """A dropdown's values (gradio 4+ keeps (label, value) pairs)."""
    return [c[1] if isinstance(c, (tuple, list)) else c for c in dropdown.choices]


def test_components_keep_their_arguments_under_a_hosts_constructor_patch(monkeypatch) -> None:
    """reForge replaces ``gr.Image.__init__`` by a ``(self, *args, **kwargs)`` wrapper; the grid's image lost its
    elem_id, label and type there (the tab check found no ``#lora_train_grid_image``)."""
    gr = ui_gradio.gr
    original = gr.Image.__init__

    def host_patch(self, *args, **kwargs):  # what reForge's modules/gradio_extensons.py does
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gr.Image, "__init__", host_patch)
    with gr.Blocks():
        image = ui_gradio.make(gr.Image, label="Grid", type="filepath", interactive=False, elem_id="grid_image")
    assert (image.elem_id, image.label, image.type) == ("grid_image", "Grid", "filepath")
    with gr.Blocks():  # without the patch, arguments this gradio does not name are still left out
        monkeypatch.setattr(gr.Image, "__init__", original)
        plain = ui_gradio.make(gr.Image, label="Grid", elem_id="plain", no_such_argument=1)
    assert plain.elem_id == "plain"


def test_widget_values_round_trip_through_the_config() -> None:
    cfg = TrainConfig(train_data_dir="/d", trigger_word="zz", v_parameterization=True, max_train_steps=12,
                      min_snr_gamma=5.0, unet_lr=None, loss_type="smooth_l1", min_timestep=10, ip_noise_gamma=0.1,
                      masked_loss=True, conditioning_data_dir="/m", multires_noise_iterations=6,
                      sample_prompts=["a", "b c"], sample_every_n_steps=3,
                      optimizer_args={"weight_decay": 0.1}, lr_scheduler="cosine", mixed_precision="bf16")
    values = ui_fields.config_to_values(cfg)
    assert len(values) == len(dataclasses.fields(TrainConfig))
    from lora_train.engine.config.yaml_io import from_dict

    assert from_dict(ui_fields.values_to_config(values)) == cfg
    values[ui_fields.FIELD_NAMES.index("v_parameterization")] = "auto"
    values[ui_fields.FIELD_NAMES.index("max_train_steps")] = ""
    values[ui_fields.FIELD_NAMES.index("lora_rank")] = 16.0
    data = ui_fields.values_to_config(values)
    assert data["v_parameterization"] is None and data["max_train_steps"] is None and data["lora_rank"] == 16
    values[ui_fields.FIELD_NAMES.index("optimizer_args")] = "{unclosed"
    with pytest.raises(ConfigError) as info:
        ui_fields.values_to_config(values)
    assert info.value.key == "optimizer_args"


def test_dataset_table_captions_find_replace_and_flags(app, dataset_dir: Path) -> None:
    demo, runner = app
    fns = _fns(demo)
    (dataset_dir / "00_red_circle.txt").unlink()
    table, gallery, note, *_ , status = fns["load_dataset"](str(dataset_dir))
    assert status == "" and len(table) == 6 and len(gallery) == 6
    assert "1 of 6" in note and "00_red_circle.png" in note
    table = table.values.tolist()  # the page sends rows back as lists (type="array")
    table[0][1] = "shapez, red circle"
    *_, message = fns["save"](str(dataset_dir), table)
    assert "Saved 1" in message
    assert (dataset_dir / "00_red_circle.txt").read_text().strip() == "shapez, red circle"
    table, _, note, tags, _ = fns["replace"](str(dataset_dir), table, "circle", "disc", False)
    assert "all captioned" in note
    assert (dataset_dir / "00_red_circle.txt").read_text().strip() == "shapez, red disc"
    assert "red disc" in list(tags["tag"]) and "red circle" not in list(tags["tag"])


def test_paths_outside_the_allowed_folders_are_refused_in_the_tab(tmp_path: Path) -> None:
    runner = JobRunner(DiffusersHost(), PathPolicy(output_root=tmp_path / "out", input_roots=[tmp_path / "ok"]))
    demo = ui.build_ui(runner, ui.UISettings(datasets_root=tmp_path / "ok" / "ds"))
    table, _, _, tags, status = _fns(demo)["load_dataset"]("/etc")
    assert "outside the allowed folders" in status
    # the emptied tables keep their column names (a bare [] made the page show "1" and "2")
    for elem_id, value, headers in (("lora_train_captions", table, ["image", "caption"]),
                                    ("lora_train_tags", tags, ["tag", "count"])):
        sent = _component(demo, elem_id).postprocess(value)  # a dict on gradio 3, a DataframeData on 4+
        assert (sent["headers"] if isinstance(sent, dict) else sent.headers) == headers


def test_missing_captioner_weights_point_at_the_tab_setting(app, dataset_dir: Path) -> None:
    demo, _ = app
    *_, message = _fns(demo)["caption"](str(dataset_dir), "shapez", "CoCa", 0.35, False)
    assert "--captioner-weights" in message and "--allow-download" not in message
    runner = JobRunner(DiffusersHost(), PathPolicy(output_root=dataset_dir.parent / "out"))
    settings = ui.UISettings(datasets_root=dataset_dir.parent, captioner_weights=str(dataset_dir / "coca.bin"))
    *_, message = _fns(ui.build_ui(runner, settings))["caption"](str(dataset_dir), "", "CoCa", 0.35, False)
    assert "Settings > LoRA Train > Captioner weights" in message and "coca.bin" in message
    assert "--weights" not in message and "--allow-download" not in message


def test_ui_command_with_no_download_says_how_to_allow_it(tmp_path: Path, dataset_dir: Path) -> None:
    args = argparse.Namespace(output_dir=str(tmp_path / "out"), allow_dir=[str(dataset_dir.parent)],
                              base_model="tiny", config=None, captioner_weights=None, no_download=True)
    demo, _ = make_app(args)
    before = sorted(p.name for p in dataset_dir.iterdir())
    for name in ("WD14 tagger", "CoCa"):
        *_, message = _fns(demo)["caption"](str(dataset_dir), "", name, 0.35, False)
        assert "the ui command without --no-download" in message and "Settings >" not in message, message
    assert sorted(p.name for p in dataset_dir.iterdir()) == before


def test_upload_creates_a_new_dataset_folder(app, tmp_path: Path, dataset_dir: Path) -> None:
    demo, runner = app
    files = [str(p) for p in sorted(dataset_dir.iterdir())]
    folder, table, *_, status = _fns(demo)["upload"](files, "my set/..")
    assert Path(folder).parent == runner.policy.output_root / "datasets"
    assert len(table) == 6 and "Uploaded 12 file(s)" in status
    again, *_ = _fns(demo)["upload"](files, "my set/..")
    assert again != folder  # a second upload never mixes into the first


def test_preset_and_config_files(app, tmp_path: Path) -> None:
    demo, _ = app
    fns = _fns(demo)
    updates = fns["apply_preset"]("Style")
    values = {name: u["value"] for name, u in zip(preset_values("Style", "sd1"), updates, strict=False)}
    assert values["lora_rank"] == 32 and values["resolution"] == "512"
    start = ui_fields.config_to_values(TrainConfig(train_data_dir=str(tmp_path), output_name="cfgtest", lora_rank=7))
    path, message = fns["save_config"](*start)
    assert Path(path).name == "cfgtest.yaml" and "written" in message
    loaded = fns["load_config"](path)
    assert loaded[ui_fields.FIELD_NAMES.index("lora_rank")] == 7 and "Loaded" in loaded[-1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rnk: 3\n")
    assert "lora_rank" in fns["load_config"](str(bad))[-1]


def _small_run(dataset_dir: Path, **overrides) -> list:
    data = ui_fields.initial_config(ui.UISettings(datasets_root=dataset_dir), "sd1", "cpu")
    data.update(train_data_dir=str(dataset_dir), output_name="streamed", trigger_word="shapez", resolution="64",
                min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, max_train_steps=4, batch_size=2,
                log_every_n_steps=1, lr_warmup_steps=0, mixed_precision="no", lora_rank=4, lora_alpha=4,
                sample_prompts=["shapez"], sample_every_n_steps=4, sample_steps=2)
    data.update(overrides)
    return [*ui_fields.config_to_values(data), "Character"]  # the fields, then the preset dropdown


def test_the_live_view_follows_a_job_started_with_train_to_the_snippet(app, dataset_dir: Path, monkeypatch) -> None:
    demo, runner = app
    monkeypatch.setattr(ui_status, "POLL_SECONDS", 0.05)
    fns = _fns(demo)
    page = Page(demo)
    try:
        progress, *_ = page.poll()
        assert progress == "Idle."
        progress, message, *_ = fns["start"](*_small_run(dataset_dir))  # returns at once; the page polls
        assert "streamed" in message
        job = runner.current
        assert job.done_event.wait(120)
        progress, frame, _validation, sample, log, group, output, snippet = page.poll()
        assert "Done" in progress and "step 4/4" in progress
        assert list(_value(frame)["step"]) == [1, 2, 3, 4]
        assert _value(sample) is not None and group["visible"] is True
        assert Path(_value(output)) == runner.policy.output_root / "streamed.safetensors"
        assert _value(snippet) == "<lora:streamed:0.7> shapez"
        assert f"`{job.output}`" in progress and "<lora:streamed:0.7> shapez" in progress
        assert f"`{job.cfg.output_dir}`" in progress and Path(job.cfg.output_dir).is_dir()  # the run's state
        # nothing changed since: the next poll does not send the image, the plot or the log again
        _, frame, _validation, sample, log, *_ = page.poll()
        assert all(isinstance(u, dict) and "value" not in u for u in (frame, sample, log))
        # a page opened (or reloaded) now sees the finished job at once
        progress, _, _validation, sample, *_ = Page(demo).poll()
        assert "Done" in progress and _value(sample) is not None
    finally:
        page.close()
    # a bad value comes back as a message naming the field, and nothing starts
    progress, message, *_ = fns["start"](*_small_run(dataset_dir, learning_rate=-1))
    assert "learning_rate" in message and len(runner.jobs) == 1


def test_an_output_name_with_a_path_is_refused_in_the_tab_as_in_the_cli(app, dataset_dir: Path) -> None:
    demo, runner = app
    _, message, *_ = _fns(demo)["start"](*_small_run(dataset_dir, output_name="../escape"))
    # the CLI's sentence
    refused = "config key 'output_name': '../escape' must be a plain file name without path separators"
    assert message == f"⚠️ {refused}" and runner.jobs == {}


def test_dataset_check_on_load_blocks_train_and_a_fix_moves_the_file(app, dataset_dir: Path) -> None:
    """Load shows the doctor's findings with thumbnails; an error stops Train in the same words; the fix moves the
    image aside (nothing deleted) and the check is clean again."""
    from PIL import Image

    from lora_train.webui import ui_doctor

    demo, runner = app
    fns = _fns(demo)
    assert {"lora_train_doctor_table", "lora_train_doctor_gallery", "lora_train_doctor_summary",
            "lora_train_doctor_exclude", "lora_train_doctor_caption"} <= _elem_ids(demo)
    Image.new("RGB", (1, 1), "red").save(dataset_dir / "dot.png")
    (dataset_dir / "dot.txt").write_text("shapez, a dot")
    values = _small_run(dataset_dir)
    summary, table, gallery, tabs = fns["check"](lambda *a, **k: None, *values)  # what Load shows (progress first)
    assert tabs["selected"] == "doctor"  # errors bring the Dataset check forward
    assert "Train is blocked" in summary and "1 error" in summary
    rows = table.values.tolist()
    assert rows[0][:2] == ["ERROR", "image-too-small"] and "dot.png" in rows[0][3]
    assert (str(dataset_dir / "dot.png"), "error: image-too-small · dot.png (1x1, bucket 64x64: upscaled 64.0x)") \
        in gallery
    progress, message, *_ = fns["start"](*values)
    too_small = next(f for f in ui_doctor.check_values(runner, ui_fields.values_to_config(values[:-1]), None)[0].errors)
    assert message == f"⚠️ Not started: {too_small.message}" and runner.current is None
    status, (summary, _, _) = ui_doctor.fix_values(runner, ui_fields.values_to_config(values[:-1]), "Character",
                                                  "exclude")
    assert "Moved 1 image(s)" in status and "Train is blocked" not in summary
    assert (dataset_dir / "_excluded" / "dot.png").is_file() and (dataset_dir / "_excluded" / "dot.txt").is_file()
    assert not (dataset_dir / "dot.png").exists()


def test_stop_button_stops_a_running_job_and_keeps_the_lora(app, dataset_dir: Path) -> None:
    demo, runner = app
    fns = _fns(demo)
    assert fns["stop"]() == "Nothing is training."
    fns["start"](*_small_run(dataset_dir, max_train_steps=100_000, sample_every_n_steps=0))
    job = runner.current
    while job.step < 1 and not job.done_event.is_set():
        job.done_event.wait(0.05)
    assert "Stopping" in fns["stop"]()
    assert job.done_event.wait(60)
    assert job.state == "stopped" and job.step < 100_000 and job.output.is_file()
    assert "Stopped" in ui_status.progress_text(job) and job.snippet in ui_status.progress_text(job)


def test_inside_the_webui_stop_skips_the_queue_and_the_live_view_needs_no_button(app) -> None:
    tab, _ = app
    with gr.Blocks() as root:  # as the WebUI's create_ui renders each extension tab
        with gr.Tab("LoRA Train"):
            tab.render()
    dependencies, fns = root.config["dependencies"], list(root.fns.values() if isinstance(root.fns, dict) else root.fns)
    stop_id = _component(root, "lora_train_stop")._id
    stop = [d for d in dependencies if stop_id in [t[0] if isinstance(t, (list, tuple)) else t for t in d["targets"]]]
    assert stop and stop[0]["queue"] is False
    names = [f.fn.__name__ for f in fns if getattr(f, "fn", None)]
    assert "attach" not in names  # no "Show progress" button competing with the live view
    if "tick" in names:
        assert any(type(b).__name__ == "Timer" for b in root.blocks.values())
    else:  # gradio 3: the page's load event starts the watcher; it must come along into the WebUI's Blocks
        loads = [fns[i].fn for i, d in enumerate(dependencies) if d["trigger"] == "load"]
        assert [inspect.isasyncgenfunction(fn) for fn in loads] == [True]


def test_an_idle_page_does_not_ask_the_host_for_its_model(tmp_path: Path, monkeypatch) -> None:
    """In the WebUI, reading the model before one is loaded loads it (or waits for the load): an open page with
    nothing training must not do that every second."""
    monkeypatch.setattr(ui_status, "POLL_SECONDS", 0.01)
    host = DiffusersHost()
    runner = JobRunner(host, PathPolicy(output_root=tmp_path / "out"))
    demo = ui.build_ui(runner, ui.UISettings(datasets_root=tmp_path / "ds"))
    calls = []
    monkeypatch.setattr(host, "device_type", lambda: calls.append(1) or "cpu")
    page = Page(demo)
    try:
        assert [page.poll()[0] for _ in range(3)] == ["Idle."] * 3
    finally:
        page.close()
    assert calls == []


def test_eta_is_estimated_after_the_first_step_and_long_runs_are_named() -> None:
    assert ui_status.time_left(0.0, 0.0, "cpu") == ("ETA estimating…", "")
    assert ui_status.time_left(2.0, 125.0, "cuda") == ("ETA 2:05", "")
    eta, warning = ui_status.time_left(0.07, 6 * 3600 + 100, "cpu")
    assert eta == "ETA 6:01:40"
    assert warning == "⚠️ This run will take about 6 h on this CPU; lower max_train_steps or resolution."
    assert "about 1.5 h on this GPU" in ui_status.time_left(0.5, 5400, "cuda:1")[1]


def test_status_line_of_a_running_job(tmp_path: Path) -> None:
    cfg = TrainConfig(output_name="slow", output_dir=str(tmp_path / "slow-checkpoints"))
    job = Job(id="j", cfg=cfg, state="running")
    assert "preparing" in ui_status.progress_text(job, "cpu")  # model and latents before the first step
    job.total = 1500
    text = ui_status.progress_text(job, "cpu")
    assert "step 0/1500" in text and "estimating" in text and "0:00" not in text and "it/s" not in text
    assert f"`{tmp_path / 'slow-checkpoints'}`" in text
    job.step, job.it_per_s, job.eta_s, job.loss = 3, 0.07, 1497 / 0.07, None
    text = ui_status.progress_text(job, "cpu")
    assert "ETA 5:56:25" in text and "about 5.9 h on this CPU" in text and "14.3 s/it" in text
    assert "loss" not in text  # no loss read yet
    job.losses = [(1, 0.5), (2, None), (3, 0.25)]  # the engine reports every step, reading the loss on some
    assert list(ui_status.loss_frame(job)["step"]) == [1, 3]


def test_shipped_example_still_builds_a_config_the_ui_accepts() -> None:
    from lora_train.engine.config import yaml_io

    cfg = yaml_io.load(EXAMPLE)
    assert ui_fields.values_to_config(ui_fields.config_to_values(cfg))["output_name"] == cfg.output_name


def test_ctrl_c_on_the_ui_server_stops_the_job_saves_it_and_exits(tmp_path: Path, dataset_dir: Path) -> None:
    if ui_gradio.GRADIO_MAJOR >= 4:
        pytest.skip("starts the job through gradio 3's /run/predict (the WebUI's gradio)")
    from ui_server import press_train, serve

    with serve(tmp_path) as server:
        reply = press_train(server, train_data_dir=str(dataset_dir), output_name="interrupted",
                            max_train_steps=100_000, save_every_n_steps=2, sample_every_n_steps=0)
        assert "Started" in json.dumps(reply), reply
        deadline = time.time() + 120  # until the first step checkpoint is written
        while not list(tmp_path.rglob("*.safetensors")) and time.time() < deadline:
            assert server.process.poll() is None, server.log_text()
            time.sleep(0.2)
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(120) == 0, server.log_text()
        log = server.log_text()
    assert "stopping interrupted after the current step" in log
    final = server.output / "interrupted.safetensors"
    stopped = re.search(r"stopped: (\d+)/100000 steps -> (.+)", log)
    assert stopped and Path(stopped[2].strip()) == final, log
    assert describe(str(final))["modules"]["unet"] > 0  # a complete LoRA file, not a half-written one
    states = [json.loads(p.read_text()) for p in tmp_path.rglob("state.json")]
    assert [s["step"] for s in states] == [int(stopped[1])]  # resumable from where it stopped
