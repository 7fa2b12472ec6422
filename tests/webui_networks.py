"""Apply a kohya/LyCORIS file's modules to weights as the WebUI v1.10.1's built-in Lora extension does.

``updown`` restates the formulas of extensions-builtin/Lora/network*.py (network_lora, network_hada,
network_lokr, network.finalize_updown with DoRA's apply_weight_decompose) so tests run everywhere;
``webui_updown`` imports those very modules from a WebUI tree (LORA_TRAIN_WEBUI_DIR) with stand-ins for the
``modules`` package they import, for tests that check the restatement against the real thing.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

WEBUI_DIR = os.environ.get("LORA_TRAIN_WEBUI_DIR")


def _kron(shape: torch.Size, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape)


def updown(w: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW of one module (multiplier 1): the WebUI's calc_updown, then calc_scale and DoRA as it does them."""
    dim = None
    if "lora_down.weight" in w:
        down, up = w["lora_down.weight"], w["lora_up.weight"]
        dim = down.shape[0]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)
    elif "hada_w1_a" in w:
        dim = w["hada_w1_b"].shape[0]
        delta = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
    else:
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        for factor in ("lokr_w1_b", "lokr_w2_b"):  # the WebUI's dim: the last decomposed factor's rank
            dim = w[factor].shape[0] if factor in w else dim
        delta = _kron(weight.shape, w1, w2)
    scale = float(w["alpha"]) / dim if dim is not None and "alpha" in w else 1.0
    delta = delta.reshape(weight.shape) * scale
    if "dora_scale" in w:
        delta = _dora(weight + delta, w["dora_scale"]) - weight
    return delta


def _dora(merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's W' = m · V / ‖V‖_c with V = W + ΔW, written from the formula (not from any implementation): input
    column j of V ([out, in] or [out, in, kh, kw]) is every V[i, j, ...]; each is scaled to length m[j]."""
    scaled = torch.empty_like(merged)
    for j in range(merged.shape[1]):
        column = merged[:, j]
        scaled[:, j] = column * (magnitude.flatten()[j] / column.pow(2).sum().sqrt())
    return scaled


def split_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya key: {"lora_down.weight": ..., "alpha": ...}} as the WebUI groups a file's tensors."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        key, rest = name.split(".", 1)
        modules.setdefault(key, {})[rest] = tensor
    return modules


def apply(tensors: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], real_webui: bool = False) -> None:
    """Add every module's ΔW to its weight in place (``real_webui``: computed by the WebUI's own classes); a key
    without a module fails here where the WebUI would skip it."""
    with torch.no_grad():
        for key, w in split_modules(tensors).items():
            module = modules[key]
            delta = webui_updown(w, module.weight, module) if real_webui else updown(w, module.weight)
            module.weight += delta.to(module.weight.dtype)


def _stand_ins() -> None:
    """The few names of A1111's ``modules`` package that network*.py import, for CPU float32."""
    if "modules.devices" in sys.modules:
        return
    package = types.ModuleType("modules")
    package.__path__ = []
    names = ("sd_models", "cache", "errors", "hashes", "shared", "devices", "models", "models.sd3",
             "models.sd3.mmdit")
    for name in names:
        module = types.ModuleType(f"modules.{name}")
        module.__path__ = []
        sys.modules[f"modules.{name}"] = module
    sys.modules["modules"] = package
    for name in names:
        parent, _, child = f"modules.{name}".rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[f"modules.{name}"])
    devices = sys.modules["modules.devices"]
    devices.cpu = devices.device = torch.device("cpu")
    devices.dtype = torch.float32
    sys.modules["modules.models.sd3.mmdit"].QkvLinear = type("QkvLinear", (torch.nn.Linear,), {})


def webui_updown(w: dict[str, torch.Tensor], weight: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """ΔW from the WebUI's own module classes (network_lora, network_hada, network_lokr)."""
    folder = str(Path(WEBUI_DIR) / "extensions-builtin" / "Lora")
    if folder not in sys.path:
        _stand_ins()
        sys.path.insert(0, folder)
    import network
    import network_hada
    import network_lokr
    import network_lora

    if isinstance(module, torch.nn.Conv2d):  # the WebUI takes exactly nn.Conv2d, not diffusers' subclasses
        plain = torch.nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                module.padding, device="meta")
    else:
        plain = torch.nn.Linear(module.in_features, module.out_features, device="meta")
    net = types.SimpleNamespace(te_multiplier=1.0, unet_multiplier=1.0, dyn_dim=None)
    weights = network.NetworkWeights(network_key="x", sd_key="diffusion_model_x", w=w, sd_module=plain)
    for kind in (network_lora.ModuleTypeLora(), network_hada.ModuleTypeHada(), network_lokr.ModuleTypeLokr()):
        made = kind.create_module(net, weights)
        if made is not None:
            with torch.no_grad():
                return made.calc_updown(weight)[0]
    raise AssertionError(f"no WebUI module type takes {sorted(w)}")


def webui_key_converter() -> Callable[[str, bool], str]:
    """networks.py's ``convert_diffusers_name_to_compvis`` (kohya key → the WebUI's module name), taken out of
    the file with the tables it reads: importing networks.py would need the whole WebUI."""
    source = (Path(WEBUI_DIR) / "extensions-builtin" / "Lora" / "networks.py").read_text(encoding="utf-8")
    wanted = {"re_digits", "re_x_proj", "re_compiled", "suffix_conversion", "convert_diffusers_name_to_compvis"}
    tree = ast.parse(source)
    tree.body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted or
                 isinstance(node, ast.Assign) and {getattr(t, "id", None) for t in node.targets} & wanted]
    namespace: dict = {"re": re}
    exec(compile(tree, "networks.py", "exec"), namespace)
    return namespace["convert_diffusers_name_to_compvis"]
