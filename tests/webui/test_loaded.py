"""The extension is loaded: its tab is on the page and its REST routes are mounted (the WebUI runs with --api)."""

from __future__ import annotations

from webui_client import JOBS, WebUI


def test_tab_is_on_the_page(webui: WebUI) -> None:
    reply = webui.call("GET", "/")
    assert reply.status == 200
    page = str(reply.body)
    assert "LoRA Train" in page and "tab_lora_train" in page, "the LoRA Train tab is missing from GET /"


def test_rest_routes_are_mounted(webui: WebUI) -> None:
    """Asked, not read from /openapi.json: FastAPI caches that schema at its first request, and a request made
    before the WebUI's app-started callbacks (boot.sh's readiness probe on a slow host) leaves our routes out."""
    for reply in (webui.get(f"{JOBS}/no-such-job"), webui.post(f"{JOBS}/no-such-job/stop")):
        assert reply.status == 404 and "no job 'no-such-job'" in str(reply.body), reply.body  # ours, not a bare 404
