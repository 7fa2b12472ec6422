"""forge-probe: read-only facts about the loaded model on reForge / Forge Classic (and A1111), for issue #15.

GET /forgeprobe/v1/facts  -> JSON: what shared.sd_model is, where UNet / text encoders / VAE live, dtype, device,
requires_grad, inference tensors, the attributes our a1111 adapter touches, the queue lock, the Lora loader.
"""

import inspect
import sys

import torch
from fastapi import FastAPI
from modules import script_callbacks, shared


def _cls(o):
    return None if o is None else f"{type(o).__module__}.{type(o).__qualname__}"


def _get(o, path):
    for p in path.split("."):
        if o is None or not hasattr(o, p):
            return None
        o = getattr(o, p)
    return o


def _tensor_facts(mod):
    if not isinstance(mod, torch.nn.Module):
        return None
    ps = list(mod.parameters())
    if not ps:
        return {"params": 0}
    p = ps[0]
    return {
        "params": sum(x.numel() for x in ps),
        "dtype": str(p.dtype),
        "device": str(p.device),
        "requires_grad_any": any(x.requires_grad for x in ps),
        "inference_any": any(x.is_inference() for x in ps),
        "is_leaf": p.is_leaf,
        "dtypes": sorted({str(x.dtype) for x in ps}),
    }


def facts():
    m = shared.sd_model
    out = {
        "python": sys.version,
        "torch": torch.__version__,
        "sd_model": _cls(m),
        "sd_model_mro": [f"{c.__module__}.{c.__qualname__}" for c in type(m).__mro__][:8],
    }
    paths = [
        "model",
        "model.diffusion_model",
        "cond_stage_model",
        "cond_stage_model.wrapped",
        "cond_stage_model.wrapped.transformer",
        "cond_stage_model.embedders",
        "first_stage_model",
        "forge_objects",
        "forge_objects.unet",
        "forge_objects.unet.model",
        "forge_objects.unet.model.diffusion_model",
        "forge_objects.clip",
        "forge_objects.clip.cond_stage_model",
        "forge_objects.clip.patcher",
        "forge_objects.vae",
        "forge_objects.vae.first_stage_model",
        "forge_objects_original",
        "forge_objects_after_applying_lora",
        "alphas_cumprod",
        "parameterization",
        "conditioner",
        "get_learned_conditioning",
        "apply_model",
        "encode_first_stage",
        "decode_first_stage",
        "get_first_stage_encoding",
        "is_sdxl",
        "is_sd1",
        "is_sd2",
        "is_sd3",
        "is_ssd",
        "sd_checkpoint_info",
        "sd_model_hash",
        "lowvram",
        "model.conditioning_key",
        "cond_stage_key",
        "latent_channels",
    ]
    out["attrs"] = {p: _cls(_get(m, p)) for p in paths}
    out["same_unet_object"] = _get(m, "model.diffusion_model") is not None and _get(m, "model.diffusion_model") is _get(
        m, "forge_objects.unet.model.diffusion_model"
    )
    out["same_te_object"] = _get(m, "cond_stage_model") is not None and _get(m, "cond_stage_model") is _get(
        m, "forge_objects.clip.cond_stage_model"
    )
    out["same_vae_object"] = _get(m, "first_stage_model") is not None and _get(m, "first_stage_model") is _get(
        m, "forge_objects.vae.first_stage_model"
    )
    out["tensors"] = {
        p: _tensor_facts(_get(m, p))
        for p in [
            "model.diffusion_model",
            "cond_stage_model",
            "first_stage_model",
            "forge_objects.unet.model.diffusion_model",
            "forge_objects.clip.cond_stage_model",
            "forge_objects.vae.first_stage_model",
        ]
    }
    ac = _get(m, "alphas_cumprod")
    out["alphas_cumprod"] = (
        None
        if ac is None
        else {"shape": list(ac.shape), "dtype": str(ac.dtype), "first": float(ac[0]), "last": float(ac[-1])}
    )
    out["parameterization"] = getattr(m, "parameterization", None)
    for fn in [
        "get_learned_conditioning",
        "apply_model",
        "encode_first_stage",
        "get_first_stage_encoding",
        "decode_first_stage",
    ]:
        f = _get(m, fn)
        try:
            out.setdefault("fn_src", {})[fn] = (
                f"{inspect.getsourcefile(f)}:{inspect.getsourcelines(f)[1]}" if f else None
            )
        except Exception as e:
            out.setdefault("fn_src", {})[fn] = repr(e)
    # transformer block class(es) in the UNet
    unet = _get(m, "forge_objects.unet.model.diffusion_model") or _get(m, "model.diffusion_model")
    blocks = {}
    if unet is not None:
        for mod in unet.modules():
            n = _cls(mod)
            if "Transformer" in n or "CrossAttention" in n or "Attention" in n:
                blocks[n] = blocks.get(n, 0) + 1
    out["unet_block_classes"] = blocks
    te = _get(m, "cond_stage_model")
    out["te_children"] = {k: _cls(v) for k, v in te.named_children()} if isinstance(te, torch.nn.Module) else None
    # queue lock
    from modules import call_queue

    ql = getattr(call_queue, "queue_lock", None)
    out["queue_lock"] = {"type": _cls(ql), "has_locked": hasattr(ql, "locked")}
    # Lora loader
    mods = {
        k: getattr(v, "__file__", None)
        for k, v in sys.modules.items()
        if k in ("networks", "lora", "network", "extra_networks_lora", "lora_patches")
        or k.startswith("modules_forge")
        and "lora" in k.lower()
        or k.startswith("ldm_patched.modules.lora")
        or k.startswith("ldm_patched.modules.model_patcher")
    }
    out["lora_modules"] = mods
    nets = sys.modules.get("networks")
    out["networks_has"] = (
        None
        if nets is None
        else [
            a
            for a in (
                "loaded_networks",
                "network_restore_weights_from_backup",
                "originals",
                "load_networks",
                "network_apply_weights",
            )
            if hasattr(nets, a)
        ]
    )
    # sd_models / sd_hijack helpers the a1111 adapter might use
    from modules import sd_models

    out["sd_models_has"] = [
        a
        for a in (
            "model_data",
            "reload_model_weights",
            "unload_model_weights",
            "send_model_to_cpu",
            "send_model_to_device",
            "apply_token_merging",
            "forge_model_reload",
            "model_hash",
        )
        if hasattr(sd_models, a)
    ]
    try:
        from modules import sd_hijack

        out["sd_hijack_has"] = [
            a for a in ("model_hijack", "apply_optimizations", "undo_optimizations") if hasattr(sd_hijack, a)
        ]
        mh = getattr(sd_hijack, "model_hijack", None)
        out["model_hijack"] = (
            None
            if mh is None
            else {
                "optimization_method": getattr(mh, "optimization_method", None),
                "clip": _cls(getattr(mh, "clip", None)),
            }
        )
    except Exception as e:
        out["sd_hijack_has"] = repr(e)
    # model patcher state (Forge): lora patches, backups
    up = _get(m, "forge_objects.unet")
    if up is not None:
        out["unet_patcher"] = {
            "cls": _cls(up),
            "attrs": sorted(a for a in vars(up) if not a.startswith("__"))[:40],
            "patches": len(getattr(up, "patches", {}) or {}),
            "backup": len(getattr(up, "backup", {}) or {}),
            "load_device": str(getattr(up, "load_device", None)),
            "offload_device": str(getattr(up, "offload_device", None)),
            "current_device": str(getattr(up, "current_device", None)),
        }
    try:
        from ldm_patched.modules import model_management as mm

        out["current_loaded_models"] = [
            {
                "patcher": _cls(getattr(lm, "model", None)),
                "model": _cls(getattr(getattr(lm, "model", None), "model", None)),
                "patches": len(getattr(lm.model, "patches", {}) or {}),
                "backup": len(getattr(lm.model, "backup", {}) or {}),
                "is_sd_unet": getattr(getattr(lm, "model", None), "model", None) is _get(m, "forge_objects.unet.model"),
                "is_original_patcher": getattr(lm, "model", None) is _get(m, "forge_objects_original.unet"),
                "is_current_patcher": getattr(lm, "model", None) is _get(m, "forge_objects.unet"),
            }
            for lm in getattr(mm, "current_loaded_models", [])
        ]
        out["model_management_has"] = [
            a for a in ("unload_all_models", "load_models_gpu", "soft_empty_cache", "cleanup_models") if hasattr(mm, a)
        ]
    except Exception as e:
        out["current_loaded_models"] = repr(e)
    lo = getattr(sys.modules.get("networks"), "loaded_networks", None)
    out["loaded_networks"] = None if lo is None else repr(lo)[:200]
    out["grad_enabled_here"] = torch.is_grad_enabled()
    out["inference_mode_here"] = torch.is_inference_mode_enabled()
    return out


def on_app_started(_demo, app: FastAPI):
    @app.get("/forgeprobe/v1/facts")
    def _facts():
        from modules.call_queue import queue_lock

        with queue_lock:
            return facts()


script_callbacks.on_app_started(on_app_started)
