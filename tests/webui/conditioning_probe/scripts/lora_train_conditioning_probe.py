"""Test-only WebUI extension (installed by tests/webui/run.sh, removed after the run): puts the conditioning the
WebUI builds for generation (its own ``sd_model.get_learned_conditioning``, its own ``tokenize_line``) next to
the one the LoRA trainer builds for a caption (``WebUIHost._bundle`` + ``TextCache``, the trainer's own path).

POST /lora-train-probe/v1/conditioning
    {"prompts": [...], "clip_skip": 2, "sdxl_clip_l_skip": false, "emphasis": "Original",
     "max_token_length": 225, "weighted_captions": false}
    The WebUI settings are set for the call and put back; the trainer's config leaves clip_skip unset, so it
    follows the WebUI's. Per prompt: shapes, the largest difference of the contexts (and SDXL's vector), both
    token id lists per text encoder (the WebUI's with its pad rule applied, as ``process_tokens`` does).
"""

from __future__ import annotations

import torch
from fastapi import Body, FastAPI
from modules import script_callbacks, sd_models, shared
from modules.call_queue import queue_lock

SETTINGS = ("CLIP_stop_at_last_layers", "sdxl_clip_l_skip", "emphasis")


# Forge 2's backend engines hold their tokenizers as text processing engines, not as embedders of an ldm model
FORGE_ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


def _webui_tokens(model) -> list:
    engines = [getattr(model, name) for name in FORGE_ENGINES if hasattr(model, name)]
    if engines:  # Forge 2 (its engines keep a legacy cond_stage_model attribute, set to None)
        embedders = engines
    elif hasattr(model, "conditioner"):
        embedders = model.conditioner.embedders
    else:
        embedders = [model.cond_stage_model]
    return [e for e in embedders if hasattr(e, "tokenize_line")]


def _apply_clip_skip(model) -> None:
    """Forge 2 reads "Clip skip" only when processing hands it to the engine (``processing.py`` calls
    ``set_clip_skip`` before every prompt); the other hosts read the setting while encoding."""
    if hasattr(model, "set_clip_skip"):
        model.set_clip_skip(int(shared.opts.CLIP_stop_at_last_layers))


def _ids(embedder, prompt: str) -> list[int]:
    chunks, _ = embedder.tokenize_line(prompt)
    ids = []
    for chunk in chunks:
        tokens = list(chunk.tokens)
        if embedder.id_end != embedder.id_pad:
            end = tokens.index(embedder.id_end)
            tokens = tokens[: end + 1] + [embedder.id_pad] * (len(tokens) - end - 1)
        ids += tokens
    return ids


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Largest difference over finite entries; non-finite ones (a random checkpoint's CLIP can overflow) must be
    the same values in both."""
    result = {"webui_shape": list(a.shape), "ours_shape": list(b.shape)}
    if tuple(a.shape) != tuple(b.shape):
        return result
    a, b = a.float(), b.float()
    finite = torch.isfinite(a) & torch.isfinite(b)
    same_nonfinite = bool(torch.equal(torch.isfinite(a), torch.isfinite(b)) and
                          torch.equal(a[~finite].nan_to_num(0.0, 1.0, -1.0), b[~finite].nan_to_num(0.0, 1.0, -1.0)))
    result.update(max_abs_diff=float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0,
                  max_abs=float(a[finite].abs().max()) if finite.any() else 0.0,
                  nonfinite=int((~finite).sum()), nonfinite_match=same_nonfinite)
    return result


def conditioning(body: dict = Body(...)) -> dict:  # noqa: B008 - FastAPI's own idiom
    from lora_train.engine.config.settings import TrainConfig
    from lora_train.engine.data.caches import TextCache
    from lora_train.webui.a1111 import WebUIHost

    with queue_lock:
        # only the settings this host has (Forge Classic has no "Clip skip SDXL"), restored afterwards
        saved = {key: getattr(shared.opts, key) for key in SETTINGS if hasattr(shared.opts, key)}
        asked = {"CLIP_stop_at_last_layers": int(body.get("clip_skip", 1)),
                 "sdxl_clip_l_skip": bool(body.get("sdxl_clip_l_skip", False)),
                 "emphasis": body.get("emphasis", "Original")}
        try:
            for key in saved:
                setattr(shared.opts, key, asked[key])
            if hasattr(sd_models, "forge_model_reload"):  # Forge 2 loads the checkpoint at first use, as here
                sd_models.forge_model_reload()
            model = shared.sd_model
            _apply_clip_skip(model)
            cfg = TrainConfig(max_token_length=int(body.get("max_token_length", 225)),
                              weighted_captions=bool(body.get("weighted_captions", False)))
            bundle = WebUIHost(shared, queue_lock)._bundle(cfg)
            cache = TextCache(cfg, bundle)
            results = []
            with torch.no_grad():
                for prompt in body["prompts"]:
                    webui = model.get_learned_conditioning([prompt])
                    ours = cache.encode([prompt])
                    entry = {"prompt": prompt, "clip_skip_used": bundle.clip_skip,
                             "webui_tokens": [_ids(e, prompt) for e in _webui_tokens(model)],
                             "our_tokens": [ids[0].tolist() for ids in bundle.tokenize([prompt], cache.max_chunks).ids]}
                    if isinstance(webui, dict):
                        entry["context"] = _diff(webui["crossattn"], ours.context)
                        height, width = 1024 // 8, 1024 // 8
                        vector = bundle.vector(ours, torch.zeros(1, 4, height, width))
                        entry["vector"] = _diff(webui["vector"], vector.to(webui["vector"].dtype))
                    else:
                        entry["context"] = _diff(webui, ours.context)
                    results.append(entry)
            return {"family": bundle.family, "results": results}
        finally:
            for key, value in saved.items():
                setattr(shared.opts, key, value)
            _apply_clip_skip(shared.sd_model)


def on_app_started(_demo, app: FastAPI) -> None:
    app.add_api_route("/lora-train-probe/v1/conditioning", conditioning, methods=["POST"])


script_callbacks.on_app_started(on_app_started)
