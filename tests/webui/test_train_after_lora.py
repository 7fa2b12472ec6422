"""A job sent right after a ``<lora:…>`` generation trains on the checkpoint's own weights, not the merged ones.

A1111 merges a prompt LoRA in place (with backups); reForge / Forge Classic swap in a patched copy of the UNet
whose weights stay merged, as inference tensors, until the next plain generation. Either way the job must
undo it, finish, and leave the plain image and the model as they were.
"""

from __future__ import annotations

import numpy as np
from webui_client import WebUI, train_body

PROMPT = "acceptok, a photo of a dog"
TEST_LORA = "acceptance_test_lora"  # the harness' LoRA (tests/forge/setup_host.sh links it into Forge hosts too)


def test_job_right_after_a_lora_generation_trains_and_changes_nothing(webui: WebUI, dataset, run_id: str) -> None:
    assert (webui.lora_dir / f"{TEST_LORA}.safetensors").exists(), f"the harness' {TEST_LORA} is missing"
    plain = webui.txt2img(PROMPT, "after-lora-A-plain")
    hash_before = webui.base_hash()  # after a generation: Forge 2's first one turns its CLIP embeddings to fp32
    merged = webui.txt2img(f"{PROMPT} <lora:{TEST_LORA}:1>", "after-lora-B-with-test-lora")
    assert np.abs(merged - plain).max() > 0, "the test LoRA did not change the image"
    reply = webui.submit(train_body(dataset, f"{run_id}-after-lora", 2))
    assert reply.status == 200, f"submit: HTTP {reply.status} {reply.body}"
    final = webui.wait(reply.body["id"])
    assert final["state"] == "done", f"{final['error']}\n" + "\n".join(final["log"][-15:])
    assert any("] undid the " in line for line in final["log"]), "the job log does not say it undid the merge"
    assert np.array_equal(webui.txt2img(PROMPT, "after-lora-C-plain-again"), plain), "the plain image changed"
    assert webui.base_hash() == hash_before, "the model's weights changed"
