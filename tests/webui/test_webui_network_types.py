"""LoCon, LoHa, LoKr and DoRA trained through the REST API (the tab's jobs) on the WebUI's loaded checkpoint,
then applied by its built-in Lora extension: every module matched, the image changes, and the plain prompt
gives the original image back. The figures go to out/network_types.json for the notes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
from webui_client import WebUI, kohya_modules, train_body

STEPS = 3
PROMPT = "acceptok, a photo of a cat"
TYPES = {
    "locon": {"conv_dim": 4, "conv_alpha": 4},
    "loha": {"network_module": "lycoris.kohya", "network_args": ["algo=loha", "conv_dim=4", "conv_alpha=4"]},
    "lokr": {"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=8"]},
    "dora": {"network_module": "lycoris.kohya", "network_args": ["dora_wd=True"]},
}
FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def before(webui: WebUI) -> np.ndarray:
    return webui.txt2img(PROMPT, "types-before")


@pytest.fixture(scope="module", autouse=True)
def _write_figures(webui: WebUI):
    yield
    (webui.out / "network_types.json").write_text(json.dumps(FIGURES, indent=1))


def host_applies(kind: str, webui: WebUI) -> bool:
    """Whether this host's own LoRA loader knows the type: Forge Classic's has no DoRA (no ``dora_scale`` anywhere
    in its source; it logs "LoRA version mismatch" and applies nothing), A1111's and reForge's do."""
    return not (kind == "dora" and webui.host == "forge-classic")


@pytest.mark.parametrize("kind", list(TYPES))
def test_trained_type_is_applied_whole_and_leaves_no_trace(kind: str, webui: WebUI, dataset, run_id: str,
                                                           before: np.ndarray) -> None:
    if not host_applies(kind, webui):
        pytest.skip(f"{webui.host}'s LoRA loader does not apply {kind} files")
    start = time.monotonic()
    reply = webui.submit(train_body(dataset, f"{run_id}-{kind}", STEPS, learning_rate=5e-3, **TYPES[kind]))
    assert reply.status == 200, reply.body
    final = webui.wait(reply.body["id"])
    assert final["state"] == "done", final
    name, path = final["name"], webui.lora_dir / f"{final['name']}.safetensors"
    with_lora = webui.txt2img(f"{PROMPT} <lora:{name}:1>", f"types-{kind}-with")
    matched = webui.loaded_modules(name)
    plain = webui.txt2img(PROMPT, f"types-{kind}-plain")
    FIGURES[kind] = {"seconds": round(time.monotonic() - start, 1), "modules_in_file": kohya_modules(path),
                     "modules_matched": matched, "max_pixel_change": int(np.abs(with_lora - before).max()),
                     "mean_pixel_change": round(float(np.abs(with_lora - before).mean()), 2),
                     "plain_equals_original": bool(np.array_equal(plain, before))}
    assert matched == kohya_modules(path), f"the built-in Lora loader skipped modules: {FIGURES[kind]}"
    assert np.abs(with_lora - before).max() > 0, f"<lora:{name}:1> did not change the image"
    assert np.array_equal(plain, before), "the image without the tag differs from the original"
