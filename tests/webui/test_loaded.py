"""The extension is loaded: its tab is on the page and its REST routes are mounted (the WebUI runs with --api)."""

from __future__ import annotations

from webui_client import JOBS, WebUI


def test_tab_is_on_the_page(webui: WebUI) -> None:
    reply = webui.call("GET", "/")
    assert reply.status == 200
    page = str(reply.body)
    assert "LoRA Train" in page and "tab_lora_train" in page, "the LoRA Train tab is missing from GET /"


def test_rest_routes_are_mounted(webui: WebUI) -> None:
    reply = webui.get("/openapi.json")
    assert reply.status == 200
    assert {JOBS, f"{JOBS}/{{job_id}}", f"{JOBS}/{{job_id}}/stop"} <= set(reply.body["paths"])
