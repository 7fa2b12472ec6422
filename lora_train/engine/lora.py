"""Inject, read, load and remove LoRA layers (peft) on whatever modules a bundle names.

peft does the layers; what is ours is the bookkeeping a trainer inside a live WebUI needs: a kohya key for
every wrapped module, fp32 adapter weights over fp16 host weights, and a removal that leaves the host model
exactly as it was (peft only offers that through PeftModel, which would wrap the host's object).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lora_train.engine.model import LoraTarget

ADAPTER = "default"


@dataclass
class LoraNetwork:
    """The injected layers by kohya key, and the roots they were injected into."""

    layers: dict[str, BaseTunerLayer]
    roots: list[nn.Module]

    def parameters(self, prefix: str | None = None) -> list[nn.Parameter]:
        """Adapter parameters, optionally only for keys starting with ``prefix`` (e.g. "lora_unet")."""
        params: list[nn.Parameter] = []
        for key, layer in self.layers.items():
            if prefix is None or key.startswith(prefix):
                params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        return params


def inject(targets: list[LoraTarget], rank: int, alpha: float, dropout: float) -> LoraNetwork:
    """Wrap every target with a LoRA layer (down: kaiming, up: zeros, so the model starts unchanged)."""
    by_root: dict[int, tuple[nn.Module, list[str]]] = {}
    for target in targets:
        by_root.setdefault(id(target.root), (target.root, []))[1].append(target.path)
    network = LoraNetwork(layers={}, roots=[root for root, _ in by_root.values()])
    try:
        for root, paths in by_root.values():
            config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=paths)
            inject_adapter_in_model(config, root, adapter_name=ADAPTER)
        for target in targets:
            layer = target.root.get_submodule(target.path)
            if not isinstance(layer, BaseTunerLayer):
                raise RuntimeError(f"peft did not wrap {target.path} ({type(layer).__name__})")
            for module in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
                module.float()  # adapters train in fp32 even over fp16 host weights
            network.layers[target.kohya_key] = layer
    except BaseException:
        remove(network)  # a half-injected host is restored before the error goes on
        raise
    return network


def remove(network: LoraNetwork) -> None:
    """Put every original module back in place of its LoRA wrapper and drop peft's bookkeeping."""
    for root in network.roots:
        for name, module in list(root.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                setattr(parent, child, module.get_base_layer())
        if "peft_config" in root.__dict__:
            del root.__dict__["peft_config"]


def kohya_state_dict(network: LoraNetwork, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors under kohya's names: lora_down [r, in(,1,1)], lora_up [out, r(,1,1)], alpha (0-dim)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, layer in network.layers.items():
        down = layer.lora_A[ADAPTER].weight.detach()
        up = layer.lora_B[ADAPTER].weight.detach()
        tensors[f"{key}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=dtype)
    return tensors


def network_dims(tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(rank, alpha) of a kohya file, so continuing from it keeps its shape and scale."""
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    if not downs:
        raise ValueError("no '.lora_down.weight' tensors: not a kohya-format LoRA file")
    first = downs[0][: -len(".lora_down.weight")]
    rank = tensors[downs[0]].shape[0]
    alpha = float(tensors[f"{first}.alpha"]) if f"{first}.alpha" in tensors else float(rank)
    return rank, alpha


def load_kohya(network: LoraNetwork, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a kohya file's weights into the injected layers; every key must land somewhere."""
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    unknown = sorted(modules - set(network.layers))
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} module(s) not in this model, e.g. {unknown[:3]}; "
            "was it trained for another model family?"
        )
    with torch.no_grad():
        for key in modules:
            layer = network.layers[key]
            for name, module in (("lora_down", layer.lora_A[ADAPTER]), ("lora_up", layer.lora_B[ADAPTER])):
                weight = tensors[f"{key}.{name}.weight"]
                if weight.shape != module.weight.shape:
                    raise ValueError(f"{source}: {key}.{name} has shape {tuple(weight.shape)}, "
                                     f"expected {tuple(module.weight.shape)}")
                module.weight.copy_(weight)


def trainable(params: Iterable[nn.Parameter], enabled: bool) -> None:
    for param in params:
        param.requires_grad_(enabled)
