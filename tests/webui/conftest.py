"""Fixtures for the real-WebUI acceptance checks: a booted AUTOMATIC1111 with this extension installed.

The checks skip unless ``LORA_TRAIN_WEBUI_URL`` names a running WebUI and ``LORA_TRAIN_WEBUI_DIR`` its folder
(``tests/webui/run.sh`` sets both). Optional: ``LORA_TRAIN_WEBUI_LOG`` (default ``<dir>/../webui.log``, where the
harness writes it), ``LORA_TRAIN_WEBUI_OUT`` (screenshots, images, timings; default ``<dir>/../accept-out``) and
``LORA_TRAIN_WEBUI_KEEP=1`` to keep the LoRAs the run trained in models/Lora, ``LORA_TRAIN_WEBUI_HOST`` (a1111,
reforge, forge-classic, or forge: lllyasviel's Forge 2).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from webui_client import WebUI

URL_VAR, DIR_VAR = "LORA_TRAIN_WEBUI_URL", "LORA_TRAIN_WEBUI_DIR"
HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("LORA_TRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every check here ``webui`` and skip them all when no WebUI is named (CI has none)."""
    missing = [var for var in (URL_VAR, DIR_VAR) if not os.environ.get(var)]
    skip = pytest.mark.skip(reason=f"needs a running WebUI: set {' and '.join(missing)} (see tests/webui/run.sh)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.webui)
            if missing:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def webui() -> Iterator[WebUI]:
    root = Path(os.environ[DIR_VAR]).resolve()
    out = Path(os.environ.get("LORA_TRAIN_WEBUI_OUT") or root.parent / "accept-out")
    out.mkdir(parents=True, exist_ok=True)
    ui = WebUI(url=os.environ[URL_VAR].rstrip("/"), root=root,
               log=Path(os.environ.get("LORA_TRAIN_WEBUI_LOG") or root.parent / "webui.log"), out=out,
               host=os.environ.get("LORA_TRAIN_WEBUI_HOST") or "a1111")
    yield ui
    (out / "timings.json").write_text(json.dumps(ui.timings, indent=1))


@pytest.fixture(scope="session")
def run_id() -> str:
    """A prefix for this run's LoRA names, so reruns never collide with earlier results."""
    return time.strftime("accept-%H%M%S")


@pytest.fixture(scope="session")
def dataset(webui: WebUI, run_id: str) -> Iterator[Path]:
    """Four 64x64 images with captions in the WebUI's data folder (where the extension allows datasets)."""
    folder = webui.root / "lora_train_datasets" / run_id
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"acceptok, random test pattern {i}", encoding="utf-8")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _remove_trained_loras(run_id: str) -> Iterator[None]:
    """Leave models/Lora as it was, or the WebUI's Lora tab keeps listing test files."""
    yield
    root = os.environ.get(DIR_VAR)
    if not root or os.environ.get("LORA_TRAIN_WEBUI_KEEP") == "1":
        return
    for path in (Path(root) / "models" / "Lora").glob(f"{run_id}*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's chromium through playwright (no browser download), as tests/test_browser.py launches it."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, webui: WebUI) -> Iterator[Any]:
    """The WebUI's page, fully built (its tab bar is there)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(120_000)
    page.goto(webui.url + "/")
    page.locator("#tabs > .tab-nav > button").first.wait_for()
    yield page
    page.close()
