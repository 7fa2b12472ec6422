"""Train through the REST API on the loaded checkpoint, then use the result the way a user does.

One job (6 steps, a sample prompt) trains for the whole module; the checks read what was seen on the way:
progress at each step, a txt2img sent mid-run that must wait for the GPU lock and then succeed, the files that
appeared in models/Lora, the Lora list, images with and without ``<lora:name:0.7>``, and the model hash.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from webui_client import TXT2IMG, WebUI, kohya_modules, published, train_body

STEPS = 6
PROMPT = "acceptok, a photo of a cat"
LIST_WATCH_S = 2.0


@dataclass
class Run:
    """What the module's training job showed while it ran, and what it left."""

    name: str
    final: dict[str, Any]
    steps_seen: list[int]
    entries_before: set[str]
    entries_after: set[str]
    hash_before: str
    image_before: np.ndarray
    # the txt2img sent while the job trained: its HTTP status and the job's step when it was sent and returned
    during: dict[str, Any] = field(default_factory=dict)
    # the Lora list before the job, and as read every few ms from the moment the job said done
    listed_before: set[str] = field(default_factory=set)
    listed_after_done: list[set[str]] = field(default_factory=list)


def _txt2img_while_training(webui: WebUI, job_id: str, record: dict[str, Any]) -> None:
    record["step_at_send"] = webui.job(job_id)["step"]
    reply = webui.post("/sdapi/v1/txt2img", {**TXT2IMG, "prompt": PROMPT})
    record["status"] = reply.status
    record["images"] = len(reply.body.get("images") or []) if isinstance(reply.body, dict) else 0
    record["job_at_return"] = webui.job(job_id)
    webui.timings["txt2img during training (waits for the job)"] = round(reply.seconds, 1)


@pytest.fixture(scope="module")
def run(webui: WebUI, dataset, run_id: str) -> Run:
    name = f"{run_id}-api"
    entries_before = webui.lora_entries()
    listed_before = set(webui.lora_names())
    image_before = webui.txt2img(PROMPT, "api-A-before-training")
    hash_before = webui.base_hash()  # after a generation: Forge 2's first one turns its CLIP embeddings to fp32
    body = train_body(dataset, name, STEPS, sample_prompts=["acceptok"], sample_every_n_steps=STEPS, sample_steps=2)
    start = time.monotonic()
    reply = webui.submit(body)
    assert reply.status == 200, f"submit: HTTP {reply.status} {reply.body}"
    job_id = reply.body["id"]
    steps: list[int] = []
    during: dict[str, Any] = {}
    sender: list[threading.Thread] = []

    def watch(status: dict[str, Any]) -> None:
        if status["state"] == "running":
            steps.append(status["step"])
            if not sender:
                sender.append(threading.Thread(target=_txt2img_while_training, args=(webui, job_id, during)))
                sender[0].start()

    final = webui.wait(job_id, watch)
    webui.timings[f"API job, {STEPS} steps + preview (submit to done)"] = round(time.monotonic() - start, 1)
    listed_after_done = []
    done_at = time.monotonic()  # read the list as a client would right after "done", also while the txt2img
    while time.monotonic() < done_at + LIST_WATCH_S or (sender and sender[0].is_alive()):  # sent mid-run ends
        listed_after_done.append(set(webui.lora_names()))
        time.sleep(0.005)
    if sender:
        sender[0].join(600)
    return Run(name=final["name"], final=final, steps_seen=steps, entries_before=entries_before,
               entries_after=webui.lora_entries(), hash_before=hash_before, image_before=image_before, during=during,
               listed_before=listed_before, listed_after_done=listed_after_done)


def test_job_trains_every_step_and_finishes(run: Run) -> None:
    assert run.final["state"] == "done", run.final
    assert run.final["step"] == run.final["total"] == STEPS
    assert run.final["error"] is None


def test_progress_moves_every_step(run: Run) -> None:
    """Polled 4x a second while a CPU step takes seconds: each step must show up, in order."""
    seen = sorted(set(run.steps_seen))
    assert run.steps_seen == sorted(run.steps_seen), f"progress went backwards: {run.steps_seen}"
    assert set(range(1, STEPS)) <= set(seen), f"steps reported while running: {seen} (want each of 1..{STEPS - 1})"


def test_lora_lands_in_models_lora_with_card_and_preview(run: Run, webui: WebUI) -> None:
    assert run.final["output"] == str(webui.lora_dir / f"{run.name}.safetensors")
    card = json.loads((webui.lora_dir / f"{run.name}.json").read_text(encoding="utf-8"))
    assert card.get("preferred weight") == 0.7, card
    assert card.get("sd version") == "SD1", card
    assert (webui.lora_dir / f"{run.name}.preview.png").is_file(), "sample prompts were set: a preview is due"


def test_nothing_else_appears_under_models_lora(run: Run) -> None:
    """The built-in Lora tab lists every .pt/.safetensors there, hidden ones too: state and checkpoints go elsewhere."""
    added = run.entries_after - run.entries_before
    assert added == published(run.name), f"unexpected under models/Lora: {sorted(added - published(run.name))}"


def test_listed_by_the_webui_without_restart(run: Run, webui: WebUI) -> None:
    assert run.name in webui.lora_names()


def test_listed_the_moment_the_job_says_done_and_nothing_else_drops_out(run: Run) -> None:
    """The Lora list read every few ms from "done" on always holds the new LoRA and every LoRA listed before."""
    want = run.listed_before | {run.name}
    short = [sorted(want - listed) for listed in run.listed_after_done if not want <= listed]
    assert run.listed_after_done and not short, f"{len(short)} of {len(run.listed_after_done)} reads lacked {short[:3]}"


def test_the_log_says_nothing_was_undone_after_a_plain_generation(run: Run) -> None:
    """The job trained right after a generation without <lora:…>: there was no merge to undo, so none is reported."""
    assert not [line for line in run.final["log"] if "] undid the " in line], run.final["log"]


def test_lora_changes_the_image_and_the_next_plain_image_is_the_original(run: Run, webui: WebUI) -> None:
    plain_after_training = webui.txt2img(PROMPT, "api-A2-after-training")
    with_lora = webui.txt2img(f"{PROMPT} <lora:{run.name}:0.7>", "api-B-with-lora")
    matched = webui.loaded_modules(run.name)
    plain_again = webui.txt2img(PROMPT, "api-C-plain-again")
    assert np.array_equal(plain_after_training, run.image_before), "training changed what the WebUI generates"
    modules = kohya_modules(webui.lora_dir / f"{run.name}.safetensors")
    assert matched == modules, "the Lora loader skipped modules"
    if webui.forge:  # Forge's loader also says so in its log
        assert webui.forge_loader_keys(run.name) == modules, f"no '[LORA] Loaded … {modules} keys' line for {run.name}"
    assert np.abs(with_lora - run.image_before).max() > 0, "<lora:...:0.7> did not change the image"
    assert np.array_equal(plain_again, run.image_before), "the image without the tag differs from the original"


def test_model_hash_unchanged_by_training(run: Run, webui: WebUI) -> None:
    assert webui.base_hash() == run.hash_before


def test_txt2img_during_training_waits_then_succeeds(run: Run) -> None:
    """The job holds the WebUI's queue lock: a generation sent mid-run returns only after the last step."""
    during = run.during
    assert during, "the job never showed a running step to send a txt2img at"
    assert during["status"] == 200 and during["images"] == 1, during
    assert during["step_at_send"] < STEPS, during
    assert during["job_at_return"]["step"] == STEPS, f"txt2img ran alongside training: {during['job_at_return']}"
