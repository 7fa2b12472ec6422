"""The standalone ``python -m lora_train ui`` server in a subprocess, for the browser and Ctrl-C tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    output: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"UI server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"UI server did not answer at {url}")


@contextmanager
def serve(folder: Path) -> Iterator[Server]:
    """The tab on a free port, outputs in ``folder``/out, the form pre-filled from examples/tiny.yaml."""
    port = _free_port()
    log = folder / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1",
           "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "lora_train", "ui", "--host", "127.0.0.1", "--port", str(port),
               "--output-dir", str(folder / "out"), "--config", str(ROOT / "examples" / "tiny.yaml")]
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT)
        try:
            _wait_http(f"http://127.0.0.1:{port}/", process)
            yield Server(f"http://127.0.0.1:{port}/", process, folder / "out", log)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(30)


def press_train(server: Server, **fields: Any) -> dict:
    """Press Train over HTTP as a page would (gradio 3's /run/predict), with the form's values and ``fields``."""
    with urllib.request.urlopen(server.url + "config", timeout=10) as response:
        config = json.load(response)
    components = {c["id"]: c for c in config["components"]}
    by_elem = {c.get("props", {}).get("elem_id"): c["id"] for c in components.values()}
    button = by_elem["lora_train_train"]
    index, dependency = next((i, d) for i, d in enumerate(config["dependencies"])
                             if button in [t[0] if isinstance(t, list) else t for t in d["targets"]])
    values = {i: components[i].get("props", {}).get("value") for i in dependency["inputs"]}
    for name, value in fields.items():
        values[by_elem[f"lora_train_cfg_{name}"]] = value
    body = json.dumps({"fn_index": index, "data": [values[i] for i in dependency["inputs"]],
                       "session_hash": "tests"}).encode()
    request = urllib.request.Request(server.url + "run/predict", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)
