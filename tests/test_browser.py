"""A real browser on the standalone UI: fill the form, train a few steps on the tiny model, see the result.

Uses Debian's chromium driven by playwright's Python package (no browser download). Skips cleanly when either
is missing. The screenshot is kept under test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("LORA_TRAIN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"UI server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"UI server did not answer at {url}")


@pytest.fixture
def server(tmp_path: Path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1"}
    command = [sys.executable, "-m", "lora_train", "ui", "--host", "127.0.0.1", "--port", str(port),
               "--output-dir", str(tmp_path / "out"), "--config", str(ROOT / "examples" / "tiny.yaml")]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", process)
        yield f"http://127.0.0.1:{port}/", tmp_path
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_train_from_the_browser(server, dataset_dir: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    url, tmp_path = server
    ARTIFACTS.mkdir(exist_ok=True)

    def field(page, elem_id: str):
        return page.locator(f"#{elem_id} textarea, #{elem_id} input").first

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url)
            field(page, "lora_train_cfg_train_data_dir").fill(str(dataset_dir))
            page.locator("#lora_train_load").click()
            page.get_by_text("6 image(s), all captioned.").wait_for(timeout=30_000)
            field(page, "lora_train_cfg_output_name").fill("browser lora")
            field(page, "lora_train_cfg_trigger_word").fill("shapez")
            page.locator("#lora_train_advanced").get_by_text("Advanced (every config field)").click()
            field(page, "lora_train_cfg_max_train_steps").fill("6")
            field(page, "lora_train_cfg_save_every_n_steps").fill("0")
            field(page, "lora_train_cfg_log_every_n_steps").fill("1")
            page.locator(".tab-nav button, button[role=tab]").filter(has_text="Training").first.click()
            page.locator("#lora_train_train").click()
            snippet = field(page, "lora_train_snippet")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#lora_train_snippet textarea, #lora_train_snippet input')]"
                ".some(e => e.value.includes('<lora:'))", timeout=120_000)
            assert snippet.input_value() == "<lora:browser lora:0.7> shapez"
            progress = page.locator("#lora_train_progress").first.inner_text()
            assert "step 6/6" in progress, progress
            plot = page.locator("#lora_train_loss").first
            plot.locator("canvas, svg").first.wait_for(timeout=20_000)
            page.screenshot(path=str(ARTIFACTS / "browser-train.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "out" / "browser lora.safetensors").is_file()
    assert (tmp_path / "out" / "browser lora.json").is_file()
    shutil.rmtree(tmp_path / "out" / "browser lora-checkpoints", ignore_errors=True)
