"""A real browser on the standalone UI: train to the snippet, and Stop a long run while its progress streams.

Uses Debian's chromium driven by playwright's Python package (no browser download). Skips cleanly when either
is missing. Screenshots of the tab idle, training, finished and stopped are kept under test-artifacts/ for a
person to look at.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from ui_server import serve

from lora_train.cli import describe

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("LORA_TRAIN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser(tmp_path: Path):
    """(browser, server) with the standalone UI serving outputs into tmp_path/out."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    ARTIFACTS.mkdir(exist_ok=True)
    with serve(tmp_path) as server, sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium, server
        finally:
            chromium.close()


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _open(chromium, url: str):
    page = chromium.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(url)
    return page


def _fill_form(page, dataset: Path, name: str, steps: int) -> None:
    _field(page, "lora_train_cfg_train_data_dir").fill(str(dataset))
    page.locator("#lora_train_load").click()
    page.get_by_text("6 image(s), all captioned.").wait_for(timeout=30_000)
    _field(page, "lora_train_cfg_output_name").fill(name)
    _field(page, "lora_train_cfg_trigger_word").fill("shapez")
    page.locator("#lora_train_advanced").get_by_text("Advanced (every config field)").click()
    for key, value in (("max_train_steps", steps), ("save_every_n_steps", 0), ("log_every_n_steps", 1)):
        field = _field(page, f"lora_train_cfg_{key}")
        field.fill("")
        field.press_sequentially(str(value))  # typed as a user types it, then leave the field: gradio 6 takes
        field.press("Tab")  # a value from its key and change events, which a bare fill() can race
    page.locator(".tab-nav button, button[role=tab]").filter(has_text="Training").first.click()


def _progress(page) -> str:
    return page.locator("#lora_train_progress").first.inner_text()


def _wait_progress(page, pattern: str, timeout: float) -> re.Match:
    """Wait until the status line (updated by the page itself, no button) matches ``pattern``."""
    page.wait_for_function(
        "(pattern) => new RegExp(pattern).test(document.querySelector('#lora_train_progress')?.innerText || '')",
        arg=pattern, timeout=timeout)
    match = re.search(pattern, _progress(page))
    assert match, _progress(page)
    return match


def test_train_from_the_browser(browser, dataset_dir: Path) -> None:
    chromium, server = browser
    page = _open(chromium, server.url)
    _wait_progress(page, "Idle", 30_000)
    page.screenshot(path=str(ARTIFACTS / "browser-idle.png"), full_page=True)
    _fill_form(page, dataset_dir, "browser lora", 6)
    page.locator("#lora_train_train").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#lora_train_snippet textarea, #lora_train_snippet input')]"
        ".some(e => e.value.includes('<lora:'))", timeout=120_000)
    assert _field(page, "lora_train_snippet").input_value() == "<lora:browser lora:0.7> shapez"
    progress = _progress(page)
    final = server.output / "browser lora.safetensors"
    assert "Done" in progress and "step 6/6" in progress, progress
    assert str(final) in progress and "<lora:browser lora:0.7> shapez" in progress
    run_folder = re.search(r"Checkpoints and resumable state: (.+)", progress)  # where the run's state is
    assert run_folder and Path(run_folder[1].strip()).is_dir(), progress
    page.locator("#lora_train_loss").first.locator("canvas, svg").first.wait_for(timeout=20_000)
    page.screenshot(path=str(ARTIFACTS / "browser-finished.png"), full_page=True)
    assert final.is_file() and final.with_suffix(".json").is_file()


def test_stop_while_progress_streams(browser, dataset_dir: Path) -> None:
    chromium, server = browser
    page = _open(chromium, server.url)
    _fill_form(page, dataset_dir, "browser stop", 100_000)
    page.locator("#lora_train_train").click()
    _wait_progress(page, r"step ([2-9]|\d\d+)/100000", 120_000)  # follows the job with no button pressed
    page.screenshot(path=str(ARTIFACTS / "browser-training.png"), full_page=True)

    # another tab (or a reload) follows the running job by itself, and its buttons are not queued behind it
    other = _open(chromium, server.url)
    _wait_progress(other, r"step \d+/100000", 30_000)
    _field(other, "lora_train_cfg_train_data_dir").fill(str(dataset_dir))
    other.locator("#lora_train_load").click()
    other.get_by_text("6 image(s), all captioned.").wait_for(timeout=30_000)
    assert "100000" in _progress(page) and "Stopped" not in _progress(page)

    page.locator("#lora_train_stop").click()
    page.wait_for_function("() => /step \\d+ of 100000/.test(document.querySelector('#lora_train_status')"
                           "?.innerText || '')", timeout=30_000)
    announced = int(re.search(r"step (\d+) of 100000", page.locator("#lora_train_status").first.inner_text())[1])
    stopped = int(_wait_progress(page, r"Stopped — browser stop: step (\d+)/100000", 60_000)[1])
    assert stopped <= announced  # the step that was running when Stop arrived is the last one
    _wait_progress(other, r"Stopped", 30_000)
    page.screenshot(path=str(ARTIFACTS / "browser-stopped.png"), full_page=True)
    final = server.output / "browser stop.safetensors"
    assert str(final) in _progress(page)
    assert describe(str(final))["modules"]["unet"] > 0
