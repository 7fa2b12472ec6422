"""Whatever SD family the WebUI has loaded (SD1.5, SD2.1-v or SDXL: boot it with WEBUI_CKPT=...), the API trains
it with the text encoders off and on, and the WebUI applies each file whole: every module the file holds is
matched by its Lora loader, the image changes with ``<lora:...>`` and is the original without it, and the
model's hash is unchanged. The WebUI's resident memory (idle, and the most seen while each job trained) goes to
out/family-rss.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from webui_client import TXT2IMG, WebUI, kohya_modules, save_image, train_body

STEPS = 2
PROMPT = "acceptok, a photo of a cat"
# kohya's module counts per file: (text encoders, UNet)
KOHYA_MODULES = {"SD1": (72, 192), "SD2": (138, 192), "SDXL": (72 + 192, 722)}


@dataclass
class FamilyRun:
    name: str
    text_encoder: bool
    final: dict
    peak_rss_mib: int


def _rss_mib(webui: WebUI) -> int:
    pid = int((webui.root.parent / "webui.pid").read_text().split()[0])
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


@pytest.fixture(scope="module")
def family_runs(webui: WebUI, dataset, run_id: str) -> dict:
    # idle after a plain generation, as test_memory measures it: Forge loads the UNet at the first one (and on CPU
    # casts the file's fp16 weights to fp32 then), so a cold idle would count that load as training's
    reply = webui.post("/sdapi/v1/txt2img", {**TXT2IMG, "prompt": PROMPT})
    assert reply.status == 200, f"warm-up txt2img: HTTP {reply.status} {reply.body}"
    idle = _rss_mib(webui)
    hash_before = webui.base_hash()
    runs = []
    for text_encoder in (False, True):
        name = f"{run_id}-family-te{int(text_encoder)}"
        reply = webui.submit(train_body(dataset, name, STEPS, train_text_encoder=text_encoder))
        assert reply.status == 200, f"submit (train_text_encoder={text_encoder}): HTTP {reply.status} {reply.body}"
        seen = [idle]
        final = webui.wait(reply.body["id"], lambda _status, seen=seen: seen.append(_rss_mib(webui)))
        runs.append(FamilyRun(final["name"], text_encoder, final, max(seen)))
    card = json.loads((webui.lora_dir / f"{runs[0].name}.json").read_text(encoding="utf-8"))
    family = card.get("sd version")
    (webui.out / f"family-rss-{family}.json").write_text(json.dumps(
        {"family": family, "idle_rss_mib": idle,
         "training_peak_rss_mib": {f"train_text_encoder={r.text_encoder}": r.peak_rss_mib for r in runs}}, indent=1))
    return {"family": family, "runs": runs, "hash_before": hash_before}


def _txt2img(webui: WebUI, prompt: str, label: str, family: str) -> np.ndarray:
    body = {**TXT2IMG, "prompt": prompt}
    if family == "SDXL":  # the loader's default merge mode backs up ~13.5 GB of SDXL weights: too much here
        body["override_settings"] = {"lora_functional": True}
    reply = webui.post("/sdapi/v1/txt2img", body)
    assert reply.status == 200 and reply.body.get("images"), f"txt2img {label}: HTTP {reply.status} {reply.body}"
    return save_image(reply.body["images"][0], webui.out / f"{label}.png")


def test_each_run_trains_kohyas_modules(family_runs: dict, webui: WebUI) -> None:
    family = family_runs["family"]
    assert family in KOHYA_MODULES, f"the card says {family!r}"
    text, unet = KOHYA_MODULES[family]
    for run in family_runs["runs"]:
        assert run.final["state"] == "done", run.final
        file = webui.lora_dir / f"{run.name}.safetensors"
        assert kohya_modules(file) == unet + (text if run.text_encoder else 0), (family, run.text_encoder)


def test_sd2_768_v_is_trained_as_v_prediction(family_runs: dict, webui: WebUI) -> None:
    if family_runs["family"] != "SD2":
        pytest.skip("runs where the WebUI has SD2 loaded (WEBUI_CKPT=..., tests/webui/make_checkpoint_sd2v.py)")
    from safetensors import safe_open

    with safe_open(str(webui.lora_dir / f"{family_runs['runs'][0].name}.safetensors"), "np") as handle:
        metadata = handle.metadata()
    assert metadata["ss_v2"] == "True" and metadata["ss_v_parameterization"] == "True", metadata


def test_every_module_applies_and_the_model_is_unchanged(family_runs: dict, webui: WebUI) -> None:
    family = family_runs["family"]
    before = _txt2img(webui, PROMPT, f"family-{family}-plain", family)
    for run in family_runs["runs"]:
        label = f"family-{family}-te{int(run.text_encoder)}"
        with_lora = _txt2img(webui, f"{PROMPT} <lora:{run.name}:0.7>", f"{label}-lora", family)
        matched = webui.loaded_modules(run.name)
        assert matched == kohya_modules(webui.lora_dir / f"{run.name}.safetensors"), (label, matched)
        assert np.abs(with_lora - before).max() > 0, f"{label}: <lora:...> did not change the image"
    assert np.array_equal(_txt2img(webui, PROMPT, f"family-{family}-plain-again", family), before)
    assert webui.base_hash() == family_runs["hash_before"]
