"""The tab's Blocks build on the installed gradio, cover every config field, and their handlers work.

Handlers are called the way gradio calls them (the functions registered on the Blocks), without a browser;
tests/test_browser.py drives the real page.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

gr = pytest.importorskip("gradio")

from lora_train import ui  # noqa: E402
from lora_train.config import ConfigError, TrainConfig  # noqa: E402
from lora_train.jobs import JobRunner  # noqa: E402
from lora_train.paths import PathPolicy  # noqa: E402
from lora_train.ui_cli import DiffusersHost, make_app  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


def _fns(demo) -> dict:
    functions = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    return {f.fn.__name__: f.fn for f in functions if getattr(f, "fn", None)}


def _elem_ids(demo) -> set[str]:
    return {getattr(block, "elem_id", None) for block in demo.blocks.values()} - {None}


@pytest.fixture
def app(tmp_path: Path):
    args = argparse.Namespace(output_dir=str(tmp_path / "out"), allow_dir=[str(tmp_path)], base_model="tiny",
                              config=str(EXAMPLE), captioner_weights=None)
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


def test_widget_values_round_trip_through_the_config() -> None:
    cfg = TrainConfig(train_data_dir="/d", trigger_word="zz", v_parameterization=True, max_train_steps=12,
                      min_snr_gamma=5.0, unet_lr=None, sample_prompts=["a", "b c"], sample_every_n_steps=3,
                      optimizer_args={"weight_decay": 0.1}, lr_scheduler="cosine", mixed_precision="bf16")
    values = ui.config_to_values(cfg)
    assert len(values) == len(dataclasses.fields(TrainConfig))
    from lora_train.config import from_dict

    assert from_dict(ui.values_to_config(values)) == cfg
    values[ui.FIELD_NAMES.index("v_parameterization")] = "auto"
    values[ui.FIELD_NAMES.index("max_train_steps")] = ""
    values[ui.FIELD_NAMES.index("lora_rank")] = 16.0
    data = ui.values_to_config(values)
    assert data["v_parameterization"] is None and data["max_train_steps"] is None and data["lora_rank"] == 16
    values[ui.FIELD_NAMES.index("optimizer_args")] = "{unclosed"
    with pytest.raises(ConfigError) as info:
        ui.values_to_config(values)
    assert info.value.key == "optimizer_args"


def test_dataset_table_captions_find_replace_and_flags(app, dataset_dir: Path) -> None:
    demo, runner = app
    fns = _fns(demo)
    (dataset_dir / "00_red_circle.txt").unlink()
    table, gallery, note, *_ , status = fns["load_dataset"](str(dataset_dir))
    assert status == "" and len(table) == 6 and len(gallery) == 6
    assert "1 of 6" in note and "00_red_circle.png" in note
    table[0][1] = "shapez, red circle"
    *_, message = fns["save"](str(dataset_dir), table)
    assert "Saved 1" in message
    assert (dataset_dir / "00_red_circle.txt").read_text().strip() == "shapez, red circle"
    table, _, note, tags, _ = fns["replace"](str(dataset_dir), table, "circle", "disc", False)
    assert "all captioned" in note
    assert (dataset_dir / "00_red_circle.txt").read_text().strip() == "shapez, red disc"
    assert any(tag == "disc" or "disc" in tag for tag, _ in tags) or tags


def test_paths_outside_the_allowed_folders_are_refused_in_the_tab(tmp_path: Path) -> None:
    runner = JobRunner(DiffusersHost(), PathPolicy(output_root=tmp_path / "out", input_roots=[tmp_path / "ok"]))
    demo = ui.build_ui(runner, ui.UISettings(datasets_root=tmp_path / "ok" / "ds"))
    *_, status = _fns(demo)["load_dataset"]("/etc")
    assert "outside the allowed folders" in status


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
    values = {name: u["value"] for name, u in zip(ui.preset_values("Style", "sd1"), updates, strict=False)}
    assert values["lora_rank"] == 32 and values["resolution"] == "512"
    start = ui.config_to_values(TrainConfig(train_data_dir=str(tmp_path), output_name="cfgtest", lora_rank=7))
    path, message = fns["save_config"](*start)
    assert Path(path).name == "cfgtest.yaml" and "written" in message
    loaded = fns["load_config"](path)
    assert loaded[ui.FIELD_NAMES.index("lora_rank")] == 7 and "Loaded" in loaded[-1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rnk: 3\n")
    assert "lora_rank" in fns["load_config"](str(bad))[-1]


def test_train_button_streams_progress_to_the_snippet(app, dataset_dir: Path) -> None:
    demo, runner = app
    fns = _fns(demo)
    data = ui.initial_config(ui.UISettings(datasets_root=dataset_dir), "sd1")
    data.update(train_data_dir=str(dataset_dir), output_name="streamed", trigger_word="shapez", resolution="64",
                min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, max_train_steps=4, batch_size=2,
                log_every_n_steps=1, lr_warmup_steps=0, mixed_precision="no", lora_rank=4, lora_alpha=4,
                sample_prompts=["shapez"], sample_every_n_steps=4, sample_steps=2)
    updates = list(fns["start"](*ui.config_to_values(data)))
    progress, frame, sample, log, group, output, snippet, message = updates[-1]
    assert "Done" in progress and "step 4/4" in progress
    assert list(frame["step"]) == [1, 2, 3, 4]
    assert sample is not None and group["visible"] is True
    assert Path(output) == runner.policy.output_root / "streamed.safetensors"
    assert snippet == "<lora:streamed:0.7> shapez" and "streamed" in message
    # a bad value comes back as a message naming the field, and nothing starts
    data["learning_rate"] = -1
    (*_, message), = list(fns["start"](*ui.config_to_values(data)))
    assert "learning_rate" in message and len(runner.jobs) == 1


def test_stop_button_without_a_job(app) -> None:
    demo, _ = app
    assert _fns(demo)["stop"]() == "Nothing is training."
    progress, *_ = next(_fns(demo)["attach"]())
    assert progress == "Idle."


def test_shipped_example_still_builds_a_config_the_ui_accepts() -> None:
    from lora_train import config

    cfg = config.load(EXAMPLE)
    assert ui.values_to_config(ui.config_to_values(cfg))["output_name"] == cfg.output_name
