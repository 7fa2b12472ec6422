"""Training reuses the loaded model: the WebUI's resident memory while a job trains stays far below idle + a second
copy of the weights (Forge 2 included, whose weights are made ordinary tensors in place at the first job).

Reads the WebUI's process tree from ``/proc`` (the harness writes its pid to ``WORKDIR/webui.pid``); the idle and
peak numbers go to timings.json.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from webui_client import WebUI, train_body

STEPS = 6
DTYPE_BYTES = {"torch.float32": 4, "torch.float16": 2, "torch.bfloat16": 2}


def _tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    return [pid] + [q for kid in kids for q in _tree(kid)]


def _rss_mib(pid: int) -> float:
    total = 0
    for proc in _tree(pid):
        try:
            text = Path(f"/proc/{proc}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def test_training_adds_far_less_than_a_copy_of_the_model(webui: WebUI, dataset: Path, run_id: str) -> None:
    pid = int((webui.root.parent / "webui.pid").read_text().strip())
    webui.txt2img("a photo of a cat", "memory-warm")  # the model loaded and used once
    info = webui.get("/probe/v1/info").body
    weights_mib = info["parameters"] * DTYPE_BYTES.get(info["dtype"], 4) / 2**20
    time.sleep(2)
    idle = 0.0
    for _ in range(5):
        idle = max(idle, _rss_mib(pid))
        time.sleep(0.2)
    peak, done = [idle], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib(pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        reply = webui.submit(train_body(dataset, f"{run_id}-memory", STEPS))
        assert reply.status == 200, reply.body
        final = webui.wait(reply.body["id"])
    finally:
        done.set()
        sampler.join()
    assert final["state"] == "done", final
    webui.timings["RSS idle after a generation (MiB)"] = round(idle)
    webui.timings[f"RSS peak while training {STEPS} steps (MiB)"] = round(peak[0])
    webui.timings["weights of the loaded model (MiB)"] = round(weights_mib)
    assert peak[0] - idle < weights_mib / 2, (
        f"training took {peak[0] - idle:.0f} MiB over idle ({idle:.0f} MiB); the weights are {weights_mib:.0f} MiB")
