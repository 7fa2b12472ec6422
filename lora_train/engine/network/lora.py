"""Inject, read, load and remove LoRA/LoCon/LoHa/LoKr/DoRA layers on whatever modules a bundle names.

peft does the layers (DoRA's rescaling excepted, see dora.py); what is ours is the bookkeeping a trainer
inside a live WebUI needs: a kohya key for every wrapped module, fp32 adapter weights over fp16 host weights,
the tensors under the names kohya/LyCORIS files use, and a removal that leaves the host model exactly as it was
(peft only offers that through PeftModel, which would wrap the host's object).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lora_train.engine.config.network_spec import NetworkSpec
from lora_train.engine.model import LoraTarget
from lora_train.engine.network.dora import DoraLayer

ADAPTER = "default"
# peft's parameter name → the name in a kohya/LyCORIS file (LoHa/LoKr names are the same in both).
_FILE_NAMES = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}
PLAIN_LORA = NetworkSpec()
# LoRA+ trains these faster: the output-side factor of each product (kohya: "lora_up").
UP_FACTORS = ("lora_B", "hada_w1_a", "hada_w2_a", "lokr_w1_a", "lokr_w2_a")


@dataclass
class LoraNetwork:
    """The injected layers by kohya key, the roots they were injected into, and DoRA's wrappers by key."""

    layers: dict[str, BaseTunerLayer]
    roots: list[nn.Module]
    dora: dict[str, DoraLayer] = field(default_factory=dict)
    undo: list[Callable[[], None]] = field(default_factory=list)  # the targets' prepare steps, taken back

    def named_tensors(self, key: str) -> dict[str, nn.Parameter]:
        """One module's trainable tensors under their file names (``lora_down.weight``, ``hada_w1_a``, ...)."""
        layer = self.layers[key]
        tensors: dict[str, nn.Parameter] = {}
        for name in layer.adapter_layer_names:
            holder = getattr(layer, name)
            if ADAPTER in holder:
                value = holder[ADAPTER]
                tensors[_FILE_NAMES.get(name, name)] = value.weight if isinstance(value, nn.Module) else value
        if key in self.dora:
            tensors["dora_scale"] = self.dora[key].dora_scale
        return tensors

    def parameters(self, prefix: str | None = None, up: bool | None = None) -> list[nn.Parameter]:
        """Adapter parameters, optionally only for keys starting with ``prefix`` (e.g. "lora_unet") and only
        the up factors (``up=True``, for LoRA+) or only the others (``up=False``)."""
        up_names = {_FILE_NAMES.get(name, name) for name in UP_FACTORS}
        return [
            param
            for key in self.layers if prefix is None or key.startswith(prefix)
            for name, param in self.named_tensors(key).items() if up is None or (name in up_names) == up
        ]


def _peft_config(spec: NetworkSpec, rank: int, alpha: float, dropout: float, paths: list[str]):
    """peft's layers for the algorithm; the convolutions use the plain (non-Tucker) shapes files hold."""
    if spec.algo == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=paths)
    if spec.algo == "lokr":
        # peft 0.13.2's LoKr applies no alpha/r scale; alpha = r writes that scale 1 into the file's alpha, so
        # the WebUI (alpha / rank of the decomposed factor) computes what was trained
        return LoKrConfig(r=rank, alpha=spec.file_alpha(rank, alpha), decompose_factor=spec.factor,
                          target_modules=paths)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=paths)


def is_conv3x3(target: LoraTarget) -> bool:
    """Whether a target takes ``conv_dim``/``conv_alpha`` (kohya: 1x1 convolutions count as linear)."""
    module = target.root.get_submodule(target.path)
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def inject(targets: list[LoraTarget], rank: int, alpha: float, dropout: float,
           spec: NetworkSpec = PLAIN_LORA) -> LoraNetwork:
    """Wrap every target with the spec's layer, starting at no change (LoRA: up zeros; LoHa: w2_a zeros; LoKr:
    w1 zeros; DoRA: magnitudes = the host's norms). 3x3 convolutions get ``conv_dim``/``conv_alpha``."""
    network = LoraNetwork(layers={}, roots=list({id(t.root): t.root for t in targets}.values()))
    try:
        prepares = {id(t.prepare): t.prepare for t in targets if t.prepare is not None}
        for prepare in prepares.values():
            network.undo.append(prepare())
        groups: dict[tuple[int, bool], tuple[nn.Module, list[str]]] = {}
        for target in targets:
            groups.setdefault((id(target.root), is_conv3x3(target)), (target.root, []))[1].append(target.path)
        for (_, conv), (root, paths) in groups.items():
            dims = (spec.conv_dim, spec.conv_alpha) if conv else (rank, alpha)
            inject_adapter_in_model(_peft_config(spec, *dims, dropout, paths), root, adapter_name=ADAPTER)
        for target in targets:
            layer = target.root.get_submodule(target.path)
            if not isinstance(layer, BaseTunerLayer):
                raise RuntimeError(f"peft did not wrap {target.path} ({type(layer).__name__})")
            network.layers[target.kohya_key] = layer
            for param in network.named_tensors(target.kohya_key).values():
                param.data = param.data.float()  # adapters train in fp32 even over fp16 host weights
            if spec.dora:
                network.dora[target.kohya_key] = _wrap(target, DoraLayer(layer, ADAPTER))
    except BaseException:
        remove(network)  # a half-injected host is restored before the error goes on
        raise
    return network


def _wrap(target: LoraTarget, wrapper: nn.Module) -> nn.Module:
    parent_name, _, child = target.path.rpartition(".")
    setattr(target.root.get_submodule(parent_name) if parent_name else target.root, child, wrapper)
    return wrapper


def remove(network: LoraNetwork) -> None:
    """Put every original module back in place of its wrapper and drop peft's bookkeeping."""
    for root in network.roots:
        replaced: list[str] = []
        for name, module in list(root.named_modules()):
            inside = any(name.startswith(outer + ".") for outer in replaced)  # DoRA's inner peft layer
            if isinstance(module, (BaseTunerLayer, DoraLayer)) and not inside:
                replaced.append(name)
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                setattr(parent, child, module.get_base_layer())
        if "peft_config" in root.__dict__:
            del root.__dict__["peft_config"]
    while network.undo:
        network.undo.pop()()


def _alpha(layer: BaseTunerLayer) -> float:
    return float(layer.lora_alpha[ADAPTER] if hasattr(layer, "lora_alpha") else layer.alpha[ADAPTER])


def kohya_state_dict(network: LoraNetwork, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors under kohya/LyCORIS names: lora_down/lora_up(.weight), hada_w*_a/b, lokr_w*, dora_scale, and
    alpha (0-dim), in the shapes the WebUI's network_*.py read."""
    tensors: dict[str, torch.Tensor] = {}
    for key, layer in network.layers.items():
        for name, param in network.named_tensors(key).items():
            tensors[f"{key}.{name}"] = param.detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(_alpha(layer), dtype=dtype)
    return tensors


def network_dims(tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(rank, alpha) of a kohya/LyCORIS file's first non-3x3 module, so continuing keeps its shape and scale."""
    for name, dim in ((".lora_down.weight", 0), (".hada_w1_b", 0), (".lokr_w2_b", 0), (".lokr_w1_b", 0)):
        matrices = [k for k in tensors if k.endswith(name) and tensors[k].shape[2:] in ((), (1, 1))]
        if matrices:
            module = matrices[0][: -len(name)]
            rank = tensors[matrices[0]].shape[dim]
            alpha = float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else float(rank)
            return rank, alpha
    raise ValueError("no '.lora_down.weight', '.hada_w1_b' or '.lokr_w*_b' tensors: not a kohya/LyCORIS file")


def load_kohya(network: LoraNetwork, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a file's weights into the injected layers; every key must land somewhere, in the same shape."""
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    unknown = sorted(modules - set(network.layers))
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} module(s) not in this model, e.g. {unknown[:3]}; "
            "was it trained for another model family, or with conv_dim where this run has none?"
        )
    with torch.no_grad():
        for key in modules:
            wanted = network.named_tensors(key)
            given = {k[len(key) + 1:] for k in tensors if k.startswith(key + ".")} - {"alpha"}
            if given != set(wanted):
                raise ValueError(f"{source}: {key} holds {sorted(given)}, this run's network needs "
                                 f"{sorted(wanted)}; set the network_module/network_args it was trained with")
            for name, param in wanted.items():
                weight = tensors[f"{key}.{name}"]
                if weight.shape != param.shape:
                    raise ValueError(f"{source}: {key}.{name} has shape {tuple(weight.shape)}, expected "
                                     f"{tuple(param.shape)} (same lora_rank, conv_dim and factor as its run?)")
                param.copy_(weight)


def trainable(params: Iterable[nn.Parameter], enabled: bool) -> None:
    for param in params:
        param.requires_grad_(enabled)
