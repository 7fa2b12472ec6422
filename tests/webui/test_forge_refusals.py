"""On Forge 2, a model Forge keeps quantised is refused in one sentence naming the option to change, by the API (409)
and in the tab alike, and nothing is written. Runs only with ``tests/webui/run.sh --host forge``.

"Diffusion in Low Bits" = float8-e4m3fn is set the way Forge's own options API takes it (a memory option changes with
it, which makes Forge pick up new model-loading parameters); Forge loads the FP8 UNet at the next use. Both are put
back afterwards and the next generation loads the checkpoint as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from webui_client import WebUI, train_body

OPTION = "Diffusion in Low Bits"


@pytest.fixture(scope="module")
def fp8(webui: WebUI) -> Iterator[None]:
    if webui.host != "forge":
        pytest.skip("Forge 2's storage options (run.sh --host forge)")
    options = webui.get("/sdapi/v1/options").body
    memory, dtype = options["forge_inference_memory"], options.get("forge_unet_storage_dtype", "Automatic")
    reply = webui.post("/sdapi/v1/options", {"forge_unet_storage_dtype": "float8-e4m3fn",
                                             "forge_inference_memory": memory + 1})
    assert reply.status == 200, reply.body
    try:
        yield
    finally:  # each memory change makes Forge re-read the loading parameters (a page load may have reset memory)
        for body in ({"forge_unet_storage_dtype": dtype, "forge_inference_memory": memory + 2},
                     {"forge_inference_memory": memory}):
            assert webui.post("/sdapi/v1/options", body).status == 200
        webui.txt2img("a photo of a cat", "forge-refusal-restored")  # Forge loads the checkpoint as before
        assert "float8" not in webui.get("/probe/v1/info").body["dtype"], "Diffusion in Low Bits is still FP8"


def test_api_refuses_an_fp8_unet_with_409_naming_the_option(fp8: None, webui: WebUI, dataset: Path,
                                                            run_id: str) -> None:
    before = webui.lora_entries()
    reply = webui.submit(train_body(dataset, f"{run_id}-fp8", 1))
    webui.settle(reply)
    assert reply.status == 409, f"HTTP {reply.status} {reply.body}"
    message = reply.detail()["message"]
    assert "quantised (float8_e4m3fn)" in message and OPTION in message and "Automatic" in message, message
    assert webui.lora_entries() == before


def test_tab_shows_the_same_sentence(fp8: None, page: Any, webui: WebUI, dataset: Path) -> None:
    page.get_by_role("tab", name="LoRA Train").first.click()
    box = page.locator("#lora_train_cfg_train_data_dir textarea, #lora_train_cfg_train_data_dir input").first
    box.fill(str(dataset))
    box.press("Tab")
    page.locator("#lora_train_train").click()
    page.wait_for_function(f"() => /{OPTION}/.test(document.querySelector('#lora_train_status').innerText)",
                           timeout=120_000)
    page.locator("#lora_train_status").first.screenshot(path=str(webui.out / "forge2-fp8-refused.png"))
    text = page.locator("#lora_train_status").first.inner_text()
    assert "quantised (float8_e4m3fn)" in text and OPTION in text, text
