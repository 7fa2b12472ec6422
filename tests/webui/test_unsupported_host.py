"""On a WebUI the extension cannot train on (lllyasviel's Forge 2, Neo) it loads, and says so instead of training.

Runs only with ``tests/webui/run.sh --host forge``, where the conftest keeps this module, test_loaded and
test_webui_log and skips the training checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from webui_client import WebUI, train_body

WORKING_HOSTS = "AUTOMATIC1111 1.10, reForge and Forge Classic"


@pytest.fixture(autouse=True)
def _only_on_a_refused_host(webui: WebUI) -> None:
    if webui.host != "forge":
        pytest.skip("checks the refusal on Forge 2 (run.sh --host forge)")


def test_api_refuses_with_409_naming_the_hosts_that_work(webui: WebUI, dataset: Path, run_id: str) -> None:
    webui.txt2img("a photo of a cat", "forge2-txt2img")  # the model is loaded and generates
    before = webui.lora_entries()
    reply = webui.submit(train_body(dataset, f"{run_id}-refused", 1))
    webui.settle(reply)
    assert reply.status == 409, f"HTTP {reply.status} {reply.body}"
    message = reply.detail()["message"]
    assert "Forge 2" in message and WORKING_HOSTS in message, message
    assert webui.lora_entries() == before


def test_tab_shows_the_refusal(page: Any, webui: WebUI, dataset: Path, run_id: str) -> None:
    page.get_by_role("tab", name="LoRA Train").first.click()
    box = page.locator("#lora_train_cfg_train_data_dir textarea, #lora_train_cfg_train_data_dir input").first
    box.fill(str(dataset))
    box.press("Tab")
    page.locator("#lora_train_train").click()
    page.wait_for_function("() => /Forge 2/.test(document.querySelector('#lora_train_status').innerText)",
                           timeout=60_000)
    page.locator("#lora_train_status").first.screenshot(path=str(webui.out / "forge2-refused.png"))
    assert WORKING_HOSTS in page.locator("#lora_train_status").first.inner_text()
