"""The epoch x strength grid in the real WebUI: trained with saved steps and a validation split, rendered by the
WebUI's own txt2img, then a cell chosen.

Checks what a user relies on: the curve and its best point in the job's state, the grid PNG with its infotext
beside the run (nothing new in models/Lora), each row moving further from the plain image as the strength grows,
the same pixels txt2img gives for ``<lora:file:w>``, the card's preferred weight after a click with the LoRA still
listed, and the model's weights unchanged. The grid's time against the same images through txt2img is recorded
in timings.json (``grid vs txt2img``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webui_client import TXT2IMG, WebUI, train_body

GRIDS = "/lora-train/v1/grids"
STRENGTHS = [0.5, 1.0, 2.0]
PROMPT = "acceptok, random test pattern"


def _wait_grid(webui: WebUI, grid_id: str) -> dict:
    deadline = time.monotonic() + 900
    while True:
        status = webui.get(f"{GRIDS}/{grid_id}").body
        if status["state"] not in ("queued", "running"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.25)


@pytest.fixture(scope="module")
def made(webui: WebUI, dataset, run_id: str) -> dict:
    name = f"{run_id}-grid"
    # the loss read every step, so the tab's screenshot shows a training line beside the validation one
    body = train_body(dataset, name, 4, save_every_n_steps=2, learning_rate=1e-2, validation_split=0.25,
                      validate_every_n_steps=2, log_every_n_steps=1)
    reply = webui.submit(body)
    assert reply.status == 200, reply.body
    job = webui.wait(reply.body["id"])
    assert job["state"] == "done", job
    entries = webui.lora_entries()
    hash_before = webui.base_hash()
    request = {"lora": name, "prompts": [PROMPT], "strengths": STRENGTHS, "steps": 2, "seed": 1234,
               "negative": "blurry"}
    reply = webui.post(GRIDS, request)
    assert reply.status == 200, reply.body
    busy = webui.post(GRIDS, request)  # one thing at a time: a second grid (or a job) waits for this one
    grid = _wait_grid(webui, reply.body["id"])
    return {"name": name, "job": job, "grid": grid, "busy": busy, "entries": entries, "hash_before": hash_before,
            "hash_after": webui.base_hash(), "request": request}


def test_validation_curve_and_best_point_are_in_the_job_state(made):
    validation = made["job"]["validation"]
    # 3 training images (one of 4 held out), batch 1: every 2 steps and at the end of the first epoch (step 3)
    assert validation["enabled"] and [p[0] for p in validation["points"]] == [2, 3, 4]
    assert validation["best_step"] == min(validation["points"], key=lambda p: p[1])[0]


def test_grid_png_and_infotext_are_written_beside_the_run_not_in_models_lora(webui: WebUI, made):
    grid = made["grid"]
    assert grid["state"] == "done" and made["busy"].status == 409, (grid, made["busy"].body)
    assert [row["step"] for row in grid["rows"]] == [2, 4] and grid["columns"] == [0.0, *STRENGTHS]
    png = Path(grid["images"][0])
    assert png.is_file() and webui.lora_dir not in png.parents
    with Image.open(png) as image:
        infotext = image.info["parameters"]
        assert image.width > 4 * 64 and image.height > 2 * 64
    assert PROMPT in infotext and "Negative prompt: blurry" in infotext and "Seed: 1234" in infotext
    assert "LoRA grid" in infotext
    assert webui.lora_entries() == made["entries"]  # the saved steps were used from the run folder
    webui.timings["grid (7 images at 64x64, 2 steps)"] = grid["seconds"]


def _cells(grid: dict) -> dict[tuple[int, int], np.ndarray]:
    """Every cell of the sheet as pixels, cut out with the layout the extension uses (left labels, top header)."""
    with Image.open(grid["images"][0]) as image:
        sheet = np.asarray(image.convert("RGB")).astype(np.int16)
    left, top = max(96, 64 // 2), max(40, 64 // 6)
    return {(r, c): sheet[top + r * 64: top + (r + 1) * 64, left + c * 64: left + (c + 1) * 64]
            for r in range(len(grid["rows"])) for c in range(len(grid["columns"]))}


def test_each_row_moves_further_from_the_plain_image_as_the_strength_grows(made):
    cells = _cells(made["grid"])
    for row in range(len(made["grid"]["rows"])):
        changes = [float(np.abs(cells[(row, c)] - cells[(row, 0)]).mean()) for c in range(1, 1 + len(STRENGTHS))]
        assert changes[0] > 0 and changes == sorted(changes) and changes[-1] > changes[0], (row, changes)


def test_grid_cells_are_what_txt2img_gives(webui: WebUI, made):
    """The same images through /sdapi/v1/txt2img with ``<lora:file:w>``: the saved steps copied into models/Lora
    for this comparison only (removed afterwards). Both times go to timings.json (a measurement, not a check)."""
    grid, cells = made["grid"], _cells(made["grid"])
    copies = []
    for row in grid["rows"][:-1]:
        target = webui.lora_dir / Path(row["file"]).name
        shutil.copyfile(row["file"], target)
        copies.append(target)
    try:
        assert webui.post("/sdapi/v1/refresh-loras").status == 200
        body = {**TXT2IMG, "steps": 2, "seed": 1234, "negative_prompt": "blurry"}
        started = time.monotonic()
        images = {}
        reply = webui.post("/sdapi/v1/txt2img", {**body, "prompt": PROMPT})
        images[(0, 0)] = reply.body["images"][0]
        for r, row in enumerate(grid["rows"]):
            for c, strength in enumerate(STRENGTHS, start=1):
                prompt = f"{PROMPT} <lora:{Path(row['file']).stem}:{strength:g}>"
                images[(r, c)] = webui.post("/sdapi/v1/txt2img", {**body, "prompt": prompt}).body["images"][0]
        txt2img_s = time.monotonic() - started
    finally:
        for copy in copies:
            copy.unlink()
        webui.post("/sdapi/v1/refresh-loras")
    webui.timings["txt2img, the same 7 images"] = round(txt2img_s, 2)
    webui.timings["grid / txt2img"] = round(grid["seconds"] / txt2img_s, 3)
    from webui_client import save_image

    for (r, c), b64 in images.items():
        pixels = save_image(b64, webui.out / f"grid-txt2img-{r}-{c}.png")
        assert np.array_equal(pixels, cells[(r, c)]), (r, c)


def test_choosing_a_cell_sets_the_cards_preferred_weight_and_the_model_is_unchanged(webui: WebUI, made):
    name, grid = made["name"], made["grid"]
    card = webui.lora_dir / f"{name}.json"
    before = json.loads(card.read_text(encoding="utf-8"))
    reply = webui.post(f"{GRIDS}/{grid['id']}/choose", {"row": 1, "column": 3})
    assert reply.status == 200, reply.body
    after = json.loads(card.read_text(encoding="utf-8"))
    assert before["preferred weight"] != 2.0 and after["preferred weight"] == 2.0
    assert {k: v for k, v in after.items() if k != "preferred weight"} == \
        {k: v for k, v in before.items() if k != "preferred weight"}
    assert name in webui.lora_names()
    listed = [item for item in webui.get("/sdapi/v1/loras").body if item["name"] == name]
    assert listed, "the LoRA is still listed"
    assert webui.post(f"{GRIDS}/{grid['id']}/choose", {"row": 0, "column": 0}).status == 422  # plain column
    assert made["hash_after"] == made["hash_before"]


def test_the_tab_shows_the_validation_curve_and_a_click_on_the_grid_sets_the_weight(webui: WebUI, made, page):
    """Screenshots ``judge-validation`` (the curve with its best point) and ``judge-grid`` (the grid, a cell chosen)."""
    from test_tab_browser import open_tab, shot, text

    open_tab(page, "LoRA Train")
    page.locator("#tab_lora_train .tab-nav button", has_text="Training").first.click()
    page.wait_for_function("document.querySelector('#lora_train_validation').innerText.includes('best at step')")
    assert f"best at step {made['job']['validation']['best_step']}" in text(page, "lora_train_validation")
    shot(page, webui, "judge-validation")
    page.locator("#tab_lora_train .tab-nav button", has_text="Grid").first.click()
    box = page.locator("#lora_train_grid_lora input").first
    box.fill(made["name"])
    box.press("Enter")
    box.press("Tab")
    page.locator("#lora_train_grid_strengths textarea").first.fill(", ".join(f"{w:g}" for w in STRENGTHS))
    page.locator("#lora_train_grid_prompts textarea").first.fill(PROMPT)
    page.locator("#lora_train_grid_negative textarea").first.fill("blurry")
    for elem_id, value in (("seed", "1234"), ("steps", "2")):
        field = page.locator(f"#lora_train_grid_{elem_id} input").first
        field.fill(value)
        field.press("Tab")
    page.locator("#lora_train_grid_make").click()
    # the grid's image, or the refusal the panel shows instead (a blind wait would hide it for ten minutes)
    page.wait_for_function("document.querySelector('#lora_train_grid_image img') || "
                           "document.querySelector('#lora_train_grid_status').innerText.includes('⚠️')", timeout=600_000)
    status = text(page, "lora_train_grid_status")
    if "⚠️" in status:
        shot(page, webui, "judge-grid-refused")
    assert "⚠️" not in status, status
    image = page.locator("#lora_train_grid_image img").first
    natural = image.evaluate("img => [img.naturalWidth, img.naturalHeight, img.clientWidth, img.clientHeight]")
    left, top = max(96, 64 // 2), max(40, 64 // 6)
    x, y = left + 2 * 64 + 32, top + 64 + 32  # row 1 (the final step), column 2 (strength 1.0)
    image.click(position={"x": x * natural[2] / natural[0], "y": y * natural[3] / natural[1]})
    page.wait_for_function("document.querySelector('#lora_train_grid_choice').innerText.includes('Preferred')")
    shot(page, webui, "judge-grid")
    card = json.loads((webui.lora_dir / f"{made['name']}.json").read_text(encoding="utf-8"))
    assert card["preferred weight"] == 1.0 and made["name"] in webui.lora_names()
