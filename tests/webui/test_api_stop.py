"""A job that runs long enough to be interrupted: a second job is refused while it runs, and Stop ends it
within a few steps with a LoRA the WebUI can load."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from webui_client import JOBS, WebUI, kohya_modules, published, train_body

STEPS = 40
FEW_STEPS = 3  # Stop acts after the current step; "a few" allows for the poll that saw the step being late


@pytest.fixture(scope="module")
def running(webui: WebUI, dataset, run_id: str) -> Iterator[dict[str, Any]]:
    """A 40-step job that has shown its first step; stopped at the end whatever the checks did."""
    before = webui.lora_entries()
    # progress every step asked for explicitly: this module checks Stop, test_api_train checks the default
    reply = webui.submit(train_body(dataset, f"{run_id}-stop", STEPS, log_every_n_steps=1))
    assert reply.status == 200, f"submit: HTTP {reply.status} {reply.body}"
    job_id = reply.body["id"]
    status = webui.job(job_id)
    while status["state"] in ("queued", "waiting") or (status["state"] == "running" and status["step"] < 1):
        time.sleep(0.25)
        status = webui.job(job_id)
    yield {"id": job_id, "entries_before": before, "first_seen": status}
    webui.post(f"{JOBS}/{job_id}/stop")
    webui.wait(job_id)


def test_second_job_while_one_runs_is_409(running: dict[str, Any], webui: WebUI, dataset, run_id: str) -> None:
    assert running["first_seen"]["state"] == "running", running["first_seen"]
    reply = webui.submit(train_body(dataset, f"{run_id}-second", 2))
    webui.settle(reply)
    assert reply.status == 409, f"HTTP {reply.status} {reply.body}"


def test_api_stop_ends_stopped_within_a_few_steps_with_a_usable_lora(running: dict[str, Any], webui: WebUI) -> None:
    job_id = running["id"]
    at_stop = webui.job(job_id)
    assert at_stop["state"] == "running", f"the job was not running when Stop was sent: {at_stop}"
    start = time.monotonic()
    reply = webui.post(f"{JOBS}/{job_id}/stop")
    assert reply.status == 200, reply.body
    final = webui.wait(job_id)
    webui.timings["API stop: request to job end"] = round(time.monotonic() - start, 1)
    assert final["state"] == "stopped", final
    assert final["step"] <= at_stop["step"] + FEW_STEPS, f"stop sent at step {at_stop['step']}, ended at {final}"

    name = final["name"]
    path = webui.lora_dir / f"{name}.safetensors"
    assert final["output"] == str(path) and path.is_file(), final
    added = webui.lora_entries() - running["entries_before"]
    assert added <= published(name), f"unexpected under models/Lora: {sorted(added - published(name))}"
    assert name in webui.lora_names()
    webui.txt2img(f"a photo of a cat <lora:{name}:1>", "api-stopped-lora")
    assert webui.loaded_modules(name) == kohya_modules(path), "the stopped LoRA did not load completely"
