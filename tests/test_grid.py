"""The epoch x strength grid: rows from a run's saved files, a labelled PNG with infotext, stop and resume, a click
mapped back to its cell, the card's preferred weight, the API's grid job (409 while training), and the CLI's
renderer applying a LoRA file at a strength."""

from __future__ import annotations

import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import make_config
from PIL import Image

from lora_train.engine.output import card, grid
from lora_train.engine.output.grid_plan import GridError, plan_grid
from lora_train.engine.train.trainer import train
from lora_train.webui.jobs import TrainHost


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, _tiny_models) -> Path:
    """A finished tiny run with saved steps 2 and 4 and a card (trained once for the module)."""
    import copy

    from lora_train.engine.output.export import write_sidecar

    root = tmp_path_factory.mktemp("grid")
    data = root / "data"
    shutil.copytree(Path(__file__).resolve().parent.parent / "lora_train" / "sample_data", data)
    cfg = make_config(data, root / "out", output_name="shapes", max_train_steps=6, save_every_n_steps=2,
                      trigger_word="shp", validation_split=0.34)
    result = train(cfg, copy.deepcopy(_tiny_models["tiny"]))
    write_sidecar(result.output, "sd1", "shp", "a test LoRA", 0.8)
    return root / "out"


def _fake_renderer(calls: list):
    def render(row, strength, prompt):
        calls.append((row.step if row else None, strength, prompt))
        value = int(40 * strength) + (row.step if row else 0)
        return Image.new("RGB", (64, 64), (value, 0, 0)), f"{prompt}\nSteps: 2, Seed: 7, Size: 64x64"
    return render


def test_rows_are_the_saved_steps_in_order_with_the_final_file_last(run_dir):
    rows = grid.find_rows(run_dir / "shapes.safetensors")
    assert [r.step for r in rows] == [2, 4, 6] and rows[-1].label.endswith("(final)")
    assert rows[0].label.startswith("step 2 · epoch")
    other = run_dir / "shapes-2.safetensors"  # another run's file is no row of this one
    shutil.copyfile(run_dir / "shapes.safetensors", other)
    try:
        assert len(grid.find_rows(run_dir / "shapes.safetensors")) == 3
    finally:
        other.unlink()
    with pytest.raises(GridError, match="save_every_n_epochs"):
        lonely = run_dir.parent / "lonely.safetensors"
        shutil.copyfile(run_dir / "shapes.safetensors", lonely)
        plan_grid(lonely)


def test_grid_png_infotext_stop_resume_and_click(run_dir, tmp_path):
    spec = plan_grid(run_dir / "shapes.safetensors", prompts=["shp"], strengths=[0.5, 1.0], seed=7, steps=2)
    assert spec.columns == [0.0, 0.5, 1.0] and spec.width == 64 and spec.cell_count() == 7
    calls: list = []
    stops = iter([False, False, False, True])
    stopped = grid.render(spec, tmp_path, _fake_renderer(calls), lambda: next(stops, False))
    assert stopped.stopped and len(calls) == 3 and not stopped.images
    result = grid.render(spec, tmp_path, _fake_renderer(calls))
    assert len(calls) == 7 and result.rendered == 4 and result.reused == 3  # continued where it stopped
    assert calls[0] == (None, 0.0, "shp")  # the plain image once, not once per row
    with Image.open(result.images[0]) as sheet:
        assert "LoRA grid: shapes" in sheet.info["parameters"] and "Seed: 7" in sheet.info["parameters"]
        pixels = np.asarray(sheet.convert("RGB"))
    box = grid.layout(spec)
    for row_index, row in enumerate(spec.rows):
        for col, strength in enumerate(spec.columns):
            x, y = box.left + col * box.width + 10, box.top + row_index * box.height + 10
            assert box.cell_at(x, y) == (row_index, col)
            expected = int(40 * strength) + (row.step if col else 0)
            assert pixels[y, x, 0] == expected
    assert box.cell_at(5, box.top + 5) is None
    assert grid.cell_choice(spec, 1, 2) == (spec.rows[1], 1.0) and grid.cell_choice(spec, 0, 0) is None
    assert grid.load_spec(tmp_path, "shapes") == spec


def test_preferred_weight_and_keeping_a_step_leave_everything_else(run_dir, tmp_path):
    lora = tmp_path / "shapes.safetensors"
    shutil.copyfile(run_dir / "shapes.safetensors", lora)
    shutil.copyfile(run_dir / "shapes.json", lora.with_suffix(".json"))
    before = json.loads(lora.with_suffix(".json").read_text())
    card.set_preferred_weight(lora, 0.6)
    after = json.loads(lora.with_suffix(".json").read_text())
    assert after.pop("preferred weight") == 0.6 and before.pop("preferred weight") == 0.8 and after == before
    step = run_dir / "shapes-step00000002.safetensors"
    backup = card.keep_as_final(step, lora, tmp_path / "runs")
    assert lora.read_bytes() == step.read_bytes() and step.is_file()
    assert backup.read_bytes() == (run_dir / "shapes.safetensors").read_bytes()


class _GridHost(TrainHost):
    """A TrainHost whose grid is drawn by the fake renderer (the API and runner logic only)."""

    def __init__(self):
        self.calls: list = []
        self.release = threading.Event()

    @contextmanager
    def grid_session(self, spec, log):
        self.release.wait(30)
        yield _fake_renderer(self.calls)



def test_api_grid_job_choose_and_busy_rules(run_dir, tmp_path):
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_train.webui.api import build_router
    from lora_train.webui.jobs import JobRunner
    from lora_train.webui.paths import PathPolicy

    out = tmp_path / "Lora"
    shutil.copytree(run_dir, out)
    host = _GridHost()
    data = run_dir.parent / "data"
    runner = JobRunner(host, PathPolicy(output_root=out, input_roots=[out, data]))
    app = FastAPI()
    app.include_router(build_router(runner))
    client = TestClient(app)
    request = {"lora": "shapes", "prompts": ["shp"], "strengths": [0.5, 1.0], "steps": 2}
    assert client.post("/lora-train/v1/grids", json={"lora": str(tmp_path.parent)}).status_code == 403
    assert client.post("/lora-train/v1/grids", json={"lora": "missing"}).status_code == 422
    first = client.post("/lora-train/v1/grids", json=request)
    assert first.status_code == 200, first.json()
    assert client.post("/lora-train/v1/grids", json=request).status_code == 409  # one grid at a time
    assert client.post("/lora-train/v1/jobs", json={"train_data_dir": str(data)}).status_code == 409
    host.release.set()
    runner.grids.get(first.json()["id"]).done_event.wait(30)
    done = client.get(f"/lora-train/v1/grids/{first.json()['id']}").json()
    assert done["state"] == "done" and Path(done["images"][0]).is_file() and done["columns"] == [0.0, 0.5, 1.0]
    chosen = client.post(f"/lora-train/v1/grids/{done['id']}/choose", json={"row": 0, "column": 1})
    assert chosen.status_code == 200 and chosen.json()["preferred_weight"] == 0.5
    assert json.loads((out / "shapes.json").read_text())["preferred weight"] == 0.5
    assert client.post(f"/lora-train/v1/grids/{done['id']}/choose", json={"row": 0, "column": 0}).status_code == 422
    assert client.get("/lora-train/v1/grids/nope").status_code == 404


def test_the_cli_renderer_applies_the_file_at_its_strength(run_dir, tiny):
    from lora_train.engine.output.grid_render import BundleRenderer

    spec = plan_grid(run_dir / "shapes.safetensors", prompts=["shp"], strengths=[1.0], seed=3, steps=2)
    final = spec.rows[-1]
    with BundleRenderer(tiny, spec) as render:
        plain = np.asarray(render(None, 0.0, "shp")[0], dtype=np.int16)
        zero = np.asarray(render(final, 0.0, "shp")[0], dtype=np.int16)
        half = np.asarray(render(final, 0.5, "shp")[0], dtype=np.int16)
        full, infotext = render(final, 1.0, "shp")
    assert np.array_equal(plain, zero)  # strength 0 is the plain model
    change = [np.abs(image - plain).mean() for image in (half, np.asarray(full, dtype=np.int16))]
    assert 0 < change[0] < change[1]
    assert "shapes.safetensors, Strength: 1" in infotext
    assert not any("lora" in name for name, _ in tiny.unet.named_modules())  # the LoRA came out again


def test_saved_steps_are_lent_to_the_webuis_lora_list_for_the_grid_only(run_dir):
    from types import SimpleNamespace

    from lora_train.webui.webui_grid import registered

    class OnDisk:  # the Lora extension's network.NetworkOnDisk, as far as the grid uses it
        def __init__(self, name, filename):
            self.name, self.filename = name, filename

    final = run_dir / "shapes.safetensors"
    listed = {"shapes": OnDisk("shapes", str(final))}
    networks = SimpleNamespace(available_networks=dict(listed), available_network_aliases=dict(listed),
                               network=SimpleNamespace(NetworkOnDisk=OnDisk), networks_in_memory={})
    rows = grid.find_rows(final)
    with registered(networks, rows) as names:
        assert names[str(final)] == "shapes"  # in models/Lora already: used under its own name
        lent = [names[row.path] for row in rows[:-1]]
        assert lent == ["shapes-step00000002.lora-train-grid", "shapes-step00000004.lora-train-grid"]
        assert all(networks.available_network_aliases[n].filename == r.path for n, r in zip(lent, rows, strict=False))
    assert networks.available_networks == listed and networks.available_network_aliases == listed


def test_cli_grid_writes_the_same_layout_and_updates_the_card(run_dir, tmp_path, capsys):
    from lora_train.cli import main

    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    args = ["grid", "--lora", str(folder / "shapes.safetensors"), "--base-model", "tiny", "--steps", "2",
            "--strengths", "1", "--prompt", "shp", "--seed", "5"]
    assert main([*args, "--choose", "2,1"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1].rsplit("preferred weight", 1)[0])
    assert report["rows"][-1].endswith("(final)") and report["columns"] == [0.0, 1.0] and report["rendered"] == 4
    with Image.open(report["grid"][0]) as sheet:
        assert "Seed: 5" in sheet.info["parameters"] and sheet.size == (96 + 2 * 64, 40 + 3 * 64)
    assert json.loads((folder / "shapes.json").read_text())["preferred weight"] == 1.0
    assert main([*args, "--choose", "0,0"]) == 2  # the plain column has no weight to choose; nothing re-rendered
