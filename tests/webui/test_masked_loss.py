"""A masked run with kohya's noise and loss keys on the WebUI's live model: images whose alpha hides half of each
picture, trained with alpha_mask and Huber loss, finish and say so in the LoRA's metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from webui_client import WebUI, train_body


def test_a_masked_run_with_kohyas_loss_keys_finishes(webui: WebUI, run_id: str) -> None:
    folder = webui.root / "lora_train_datasets" / f"{run_id}-masked"
    folder.mkdir(parents=True)
    try:
        rng = np.random.default_rng(1)
        for i in range(2):
            pixels = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
            pixels[:, :, 3] = 255
            pixels[:, :32, 3] = 0  # the left half is transparent: not trained
            Image.fromarray(pixels, "RGBA").save(folder / f"img{i}.png")
            (folder / f"img{i}.txt").write_text(f"acceptok, masked pattern {i}", encoding="utf-8")
        body = train_body(folder, f"{run_id}-masked", 2, alpha_mask=True, masked_loss=True, loss_type="huber",
                          multires_noise_iterations=4, ip_noise_gamma=0.1, debiased_estimation_loss=True,
                          min_timestep=50, max_timestep=950)
        reply = webui.submit(body)
        assert reply.status == 200, f"submit: HTTP {reply.status} {reply.body}"
        final = webui.wait(reply.body["id"])
        assert final["state"] == "done", f"{final['error']}\n" + "\n".join(final["log"][-15:])
        meta = _metadata(Path(final["output"]))
        assert (meta["ss_alpha_mask"], meta["ss_loss_type"], meta["ss_multires_noise_iterations"],
                meta["modelspec.timestep_range"]) == ("True", "huber", "4", "50,950"), meta
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _metadata(path: Path) -> dict[str, str]:
    header = path.read_bytes()
    length = int.from_bytes(header[:8], "little")
    return json.loads(header[8:8 + length])["__metadata__"]
