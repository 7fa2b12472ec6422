"""acceptance-probe for reForge / Forge Classic / Forge 2: the harness probe's routes and answers, Forge's way.
Trains nothing.

The harness probe (../shared/webui-harness/probe-ext) reads A1111's Lora extension: in-place merges with
``network_weights_backup`` and ``net.modules``. Forge's Lora extension patches through ModelPatchers instead, so:

GET /probe/v1/model-hash   sha256 of ``shared.sd_model.state_dict()`` (same recipe as the harness probe);
                           ``base_sha256`` puts the loaded patchers' ``backup`` (the originals of weights a
                           ``<lora:…>`` generation replaced, UNet and text encoder) in place of the live weights.
                           Forge 2 / Neo: its engine is no nn.Module: the state of the UNet (KModel), text encoders
                           and VAE, prefixed ``unet.`` / ``clip.`` / ``vae.``; the originals are in each model's
                           ``lora_loader.backup``.
GET /probe/v1/info         loaded checkpoint, parameters, dtype/device, merged weights (len of the patcher backup).
GET /probe/v1/lora-networks  per loaded network, ``matched_modules``: the weights Forge's loader patches for the
                           LoRA now applied (``forge_objects_after_applying_lora`` UNet + CLIP patches).
"""

import functools
import hashlib
import sys
import time

import torch
from fastapi import FastAPI
from modules import script_callbacks, shared
from modules.call_queue import queue_lock


def _backup_weight(value):
    return getattr(value, "weight", value)  # reForge keeps (weight, inplace_update) tuples, Forge Classic tensors


def _originals():
    """data_ptr of each weight a loaded patcher has replaced -> the original it keeps in ``backup``.

    Every loaded patcher counts (the UNet's and the text encoder's): a ``<lora:…>`` with text encoder keys patches
    Forge's SD1ClipModel, whose weights ``shared.sd_model.cond_stage_model`` shares, under other key names.
    """
    try:
        from ldm_patched.modules import model_management
    except ImportError:  # Forge 2 / Neo
        from backend import memory_management as model_management

    over = {}
    for loaded in model_management.current_loaded_models:
        patcher = loaded.model
        loader = getattr(patcher.model, "lora_loader", None)  # Forge 2 / Neo keep the originals there
        backup = getattr(patcher, "backup", None) or getattr(loader, "backup", None)
        for key, value in (backup or {}).items():
            live = functools.reduce(getattr, key.split("."), patcher.model)
            over[live.data_ptr()] = _backup_weight(value)
    return over


def _update(digest, key, tensor):
    tensor = tensor.detach()
    digest.update(key.encode("utf-8"))
    digest.update(str(tensor.dtype).encode())
    digest.update(str(tuple(tensor.shape)).encode())
    tensor = tensor.to("cpu").contiguous().reshape(-1)
    if tensor.numel():
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))


def _modules(model):
    """(prefix, module) holding the weights: the model itself, or Forge 2's UNet, text encoders and VAE."""
    if isinstance(model, torch.nn.Module):
        return [("", model)]
    objects = model.forge_objects
    return [("unet.", objects.unet.model), ("clip.", objects.clip.cond_stage_model),
            ("vae.", objects.vae.first_stage_model)]


def _state(model):
    return {prefix + key: value for prefix, module in _modules(model) for key, value in module.state_dict().items()}


def _loaded_model():
    """Forge 2 loads the checkpoint at the first generation; load it as a generation would (a no-op elsewhere)."""
    from modules import sd_models

    reload = getattr(sd_models, "forge_model_reload", None)
    if reload is not None:
        reload()
    return shared.sd_model


def model_hash(per_key: bool = False):
    """``per_key=true`` adds each tensor's base digest (to find what changed when the hash does)."""
    with queue_lock:
        start = time.time()
        model = _loaded_model()
        state = _state(model)
        over = _originals()
        live, base = hashlib.sha256(), hashlib.sha256()
        keys = {}
        for key in sorted(state):
            _update(live, key, state[key])
            original = over.get(state[key].data_ptr())
            tensor = state[key] if original is None else original.to(dtype=state[key].dtype)
            _update(base, key, tensor)
            if per_key:
                keys[key] = hashlib.sha256()
                _update(keys[key], key, tensor)
                keys[key] = keys[key].hexdigest()[:16]
        return {"sha256": live.hexdigest(), "base_sha256": base.hexdigest(), "lora_active_modules": len(over),
                "tensors": len(state), "seconds": round(time.time() - start, 2),
                "checkpoint": getattr(getattr(model, "sd_checkpoint_info", None), "title", None),
                **({"keys": keys} if per_key else {})}


def model_info():
    model = shared.sd_model
    params = [p for _, module in _modules(model) for p in module.parameters()]
    first = params[0]
    return {"checkpoint": getattr(getattr(model, "sd_checkpoint_info", None), "title", None),
            "parameters": sum(p.numel() for p in params), "dtype": str(first.dtype),
            "device": str(first.device), "lora_active_modules": len(_originals())}


def lora_networks():
    model = shared.sd_model
    applied = getattr(model, "forge_objects_after_applying_lora", None) or model.forge_objects
    clip = getattr(applied.clip, "patcher", None)
    patched = _patched(applied.unet) + _patched(clip)
    networks = sys.modules.get("networks")
    loaded = list(getattr(networks, "loaded_networks", None) or [])
    # Forge applies every loaded network's patches to one patcher: the count is theirs together
    return {"loaded": [{"name": getattr(net, "name", None), "matched_modules": patched} for net in loaded]}


def _patched(patcher):
    """Weights a patcher patches: ``patches`` {key: …} (ldm_patched) or Forge 2's ``lora_patches`` {lora: {key: …}}."""
    if getattr(patcher, "lora_patches", None):
        return len({key for patches in patcher.lora_patches.values() for key in patches})
    return len(getattr(patcher, "patches", None) or {})


def on_app_started(_demo, app: FastAPI):
    app.get("/probe/v1/model-hash")(model_hash)
    app.get("/probe/v1/info")(model_info)
    app.get("/probe/v1/lora-networks")(lora_networks)


script_callbacks.on_app_started(on_app_started)
