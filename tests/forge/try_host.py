"""try_host.py WEBUI_DIR OUT [--facts-only] [--train NAME]: drive a booted host over HTTP (port 7861).

txt2img 64x64 2 steps twice (same seed -> same bytes?), /forgeprobe/v1/facts, and with --train a 5-step job
through /lora-train/v1/jobs, then txt2img plain (same as before?), with <lora:NAME:0.7> (different?), plain again.
Writes OUT/result.json and the images.
"""

import base64
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BASE = os.environ.get("BASE", "http://127.0.0.1:7861")
T2I = {
    "negative_prompt": "",
    "seed": 1234,
    "subseed": -1,
    "steps": 2,
    "width": 64,
    "height": 64,
    "cfg_scale": 7,
    "sampler_name": "Euler",
    "batch_size": 1,
    "n_iter": 1,
    "send_images": True,
    "save_images": False,
}


def call(method, path, body=None, timeout=900):
    req = urllib.request.Request(
        BASE + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), time.monotonic() - t
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw), time.monotonic() - t
        except Exception:
            return e.code, raw.decode("utf-8", "replace"), time.monotonic() - t


def txt2img(out, prompt, label):
    st, body, s = call("POST", "/sdapi/v1/txt2img", {**T2I, "prompt": prompt})
    assert st == 200, (st, str(body)[:2000])
    png = base64.b64decode(body["images"][0].split(",", 1)[-1])
    (out / f"{label}.png").write_bytes(png)
    info = json.loads(body.get("info") or "{}")
    return {
        "sha": hashlib.sha256(png).hexdigest()[:16],
        "seconds": round(s, 1),
        "infotext": info.get("infotexts", [""])[0][-300:],
    }


def main():
    webui, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    res["img_a"] = txt2img(out, "a photo of a cat", "a")
    res["img_b"] = txt2img(out, "a photo of a cat", "b")
    res["deterministic"] = res["img_a"]["sha"] == res["img_b"]["sha"]
    st, facts, _ = call("GET", "/forgeprobe/v1/facts")
    res["facts"] = facts if st == 200 else (st, facts)
    st, h, _ = call("GET", "/probe/v1/model-hash")
    res["hash_before"] = h.get("base_sha256", h) if isinstance(h, dict) else (st, h)
    if "--train" in sys.argv:
        name = sys.argv[sys.argv.index("--train") + 1]
        ds = webui / "lora_train_datasets" / name
        ds.mkdir(parents=True, exist_ok=True)
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ds / f"img{i}.png")
            (ds / f"img{i}.txt").write_text(f"acceptok, random test pattern {i}")
        body = {
            "train_data_dir": str(ds),
            "output_name": name,
            "resolution": "64",
            "max_train_steps": 5,
            "lora_rank": 4,
            "lora_alpha": 4,
            "learning_rate": 1e-3,
        }
        t = time.monotonic()
        st, job, _ = call("POST", "/lora-train/v1/jobs", body)
        res["submit"] = [st, job if st != 200 else {k: job.get(k) for k in ("id", "state")}]
        if st == 200:
            jid = job["id"]
            while True:
                st, j, _ = call("GET", f"/lora-train/v1/jobs/{jid}")
                if j.get("state") not in ("queued", "waiting", "running"):
                    break
                time.sleep(1)
            res["train_seconds"] = round(time.monotonic() - t, 1)
            res["job"] = {k: j.get(k) for k in ("state", "step", "total", "error", "loss", "output")}
            res["job_log_tail"] = (j.get("log") or [])[-25:]
            st, h, _ = call("GET", "/probe/v1/model-hash")
            res["hash_after"] = h.get("base_sha256", h) if isinstance(h, dict) else (st, h)
            res["img_after"] = txt2img(out, "a photo of a cat", "after")
            res["same_after_training"] = res["img_after"]["sha"] == res["img_a"]["sha"]
            res["img_lora"] = txt2img(out, f"a photo of a cat <lora:{name}:0.7>", "lora")
            res["lora_changes_image"] = res["img_lora"]["sha"] != res["img_a"]["sha"]
            st, f2, _ = call("GET", "/forgeprobe/v1/facts")
            res["facts_after_lora_gen"] = (
                {k: f2.get(k) for k in ("current_loaded_models", "loaded_networks", "unet_patcher")}
                if st == 200
                else st
            )
            st, h, _ = call("GET", "/probe/v1/model-hash")
            res["hash_after_lora_gen"] = h.get("sha256", h) if isinstance(h, dict) else (st, h)
            res["img_plain_again"] = txt2img(out, "a photo of a cat", "plain-again")
            res["same_plain_again"] = res["img_plain_again"]["sha"] == res["img_a"]["sha"]
            st, h, _ = call("GET", "/probe/v1/model-hash")
            res["hash_after_plain_again"] = h.get("sha256", h) if isinstance(h, dict) else (st, h)
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "facts"}, indent=1, default=str)[:6000])


main()
