"""A client for the running WebUI: HTTP calls, its folders, and the small helpers the acceptance checks share.

Talks to the WebUI the way a user's tools do (HTTP and files in its folders); nothing imports the extension.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

JOBS = "/lora-train/v1/jobs"
ACTIVE_STATES = ("queued", "waiting", "running")
# a job on the harness' CPU takes 10-20 s a step; this bounds a hang, it is not a performance check
JOB_TIMEOUT_S = 900
POLL_S = 0.25
TXT2IMG = {"negative_prompt": "", "seed": 1234, "subseed": -1, "steps": 2, "width": 64, "height": 64,
           "cfg_scale": 7, "sampler_name": "Euler", "scheduler": "Automatic", "batch_size": 1, "n_iter": 1,
           "send_images": True, "save_images": False}
OUR_NAMES = ("lora_train", "lora-train", "sd-webui-lora-train")


@dataclass
class Response:
    status: int
    body: Any
    seconds: float

    def detail(self) -> dict[str, Any]:
        """The extension's error shape: ``{"detail": {"field": ..., "message": ...}}``."""
        detail = self.body.get("detail") if isinstance(self.body, dict) else None
        return detail if isinstance(detail, dict) else {"field": None, "message": str(self.body)}


@dataclass
class WebUI:
    """The running WebUI: its URL, folders and the calls the checks make. ``timings`` ends up in out/."""

    url: str
    root: Path
    log: Path
    out: Path
    host: str = "a1111"  # a1111, reforge or forge-classic (tests/webui/run.sh --host)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def lora_dir(self) -> Path:
        return self.root / "models" / "Lora"

    def call(self, method: str, path: str, body: Any = None, timeout: float = JOB_TIMEOUT_S) -> Response:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        start = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                status, raw = reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return Response(status, payload, time.monotonic() - start)

    def get(self, path: str) -> Response:
        return self.call("GET", path)

    def post(self, path: str, body: Any = None) -> Response:
        return self.call("POST", path, {} if body is None else body)

    def txt2img(self, prompt: str, label: str) -> np.ndarray:
        """A 64x64, 2-step image at a fixed seed (saved as out/``label``.png), as an int array."""
        reply = self.post("/sdapi/v1/txt2img", {**TXT2IMG, "prompt": prompt})
        assert reply.status == 200 and reply.body.get("images"), f"txt2img {label}: HTTP {reply.status} {reply.body}"
        self.timings[f"txt2img {label}"] = round(reply.seconds, 1)
        return save_image(reply.body["images"][0], self.out / f"{label}.png")

    def base_hash(self) -> str:
        """sha256 of the loaded weights with the built-in Lora's in-place merges undone (the probe extension)."""
        reply = self.get("/probe/v1/model-hash")
        assert reply.status == 200, f"the acceptance probe is not installed: HTTP {reply.status} {reply.body}"
        return reply.body["base_sha256"]

    def lora_names(self) -> list[str]:
        """What the built-in Lora extension lists now (no refresh asked)."""
        reply = self.get("/sdapi/v1/loras")
        assert reply.status == 200, reply.body
        return [item["name"] for item in reply.body]

    def loaded_modules(self, name: str) -> int:
        """How many modules the built-in Lora loader matched for ``name`` in the last generation (the probe)."""
        reply = self.get("/probe/v1/lora-networks")
        assert reply.status == 200, reply.body
        return sum(net["matched_modules"] for net in reply.body["loaded"] if net["name"] == name)

    @property
    def forge(self) -> bool:
        return self.host != "a1111"

    def forge_loader_keys(self, name: str) -> int:
        """Keys Forge's LoRA loader says it loaded from ``name``.safetensors (its "[LORA] Loaded … with N keys" lines:
        reForge prints one with the total, Forge Classic one for the UNet and one for the CLIP when it has keys)."""
        text = self.log.read_text(encoding="utf-8", errors="replace")
        pattern = rf"\[LORA\] Loaded \S*{re.escape(name)}\.safetensors for .*? with (\d+) keys"
        return sum(int(n) for n in re.findall(pattern, text))

    def lora_entries(self) -> set[str]:
        """Every file and folder under models/Lora, hidden ones too, relative to it."""
        return {str(p.relative_to(self.lora_dir)) for p in self.lora_dir.rglob("*")}

    def submit(self, body: dict[str, Any]) -> Response:
        return self.post(JOBS, body)

    def job(self, job_id: str) -> dict[str, Any]:
        reply = self.get(f"{JOBS}/{job_id}")
        assert reply.status == 200, reply.body
        return reply.body

    def wait(self, job_id: str, on_poll: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
        """Poll the job until it ends; ``on_poll`` sees every status read. Returns the final status."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            status = self.job(job_id)
            on_poll(status)
            if status["state"] not in ACTIVE_STATES:
                return status
            assert time.monotonic() < deadline, f"job {job_id} still {status['state']} after {JOB_TIMEOUT_S}s"
            time.sleep(POLL_S)

    def settle(self, reply: Response) -> None:
        """A job that should not have started: stop it and wait, so it cannot disturb the next check."""
        if reply.status == 200 and isinstance(reply.body, dict) and reply.body.get("id"):
            self.post(f"{JOBS}/{reply.body['id']}/stop")
            self.wait(reply.body["id"])


def save_image(b64: str, path: Path) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1])))
    image.save(path)
    return np.asarray(image.convert("RGB")).astype(np.int16)


def train_body(dataset: Path, name: str, steps: int, **extra: Any) -> dict[str, Any]:
    """The smallest real run: 64 px, rank 4, a learning rate that changes the image within a few steps."""
    return {"train_data_dir": str(dataset), "output_name": name, "resolution": "64", "max_train_steps": steps,
            "lora_rank": 4, "lora_alpha": 4, "learning_rate": 1e-3, **extra}


def kohya_modules(path: Path) -> int:
    """How many LoRA modules a file holds (one ``.alpha`` each), so a load can be checked as complete."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as handle:
        return sum(key.endswith(".alpha") for key in handle.keys())


def published(name: str) -> set[str]:
    """What a finished job may add to models/Lora: the LoRA, its card and its preview. Nothing else."""
    return {f"{name}.safetensors", f"{name}.json", f"{name}.preview.png"}
