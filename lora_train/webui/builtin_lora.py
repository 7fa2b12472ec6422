"""The WebUI's built-in Lora extension: undo its merge before training, list a new LoRA after. WebUI knowledge,
so it lives beside the adapter.

The extension merges LoRA deltas into the live model in place; training on those weights would bake someone
else's LoRA into ours. Duck-typed over ``nn.Module`` attributes, so it needs no A1111 import and tests run anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def reset_builtin_lora(sd_model: nn.Module, loaded_networks: list | None = None) -> int:
    """Undo the WebUI's built-in Lora extension so training sees the checkpoint's own weights.

    That extension (extensions-builtin/Lora/networks.py) merges LoRA deltas into weights in place the first
    time a module runs with networks loaded, keeping the originals on the module as ``network_weights_backup``
    / ``network_bias_backup`` (for MultiheadAttention a pair: in_proj_weight, out_proj.weight) and the applied
    set as ``network_current_names``. We do what its ``network_restore_weights_from_backup`` does, mark every
    module as carrying no network, and, when given the extension's ``networks.loaded_networks`` list, empty it
    so the next forward does not merge them again (what ``networks.load_networks([])`` does). The backups stay:
    they are the originals and the extension reuses them. Returns the number of modules that carried a merge:
    a backup alone is not one (the extension keeps it after a plain generation has restored the weights).
    """
    if loaded_networks is not None:
        loaded_networks.clear()
    restored = 0
    with torch.no_grad():
        for module in sd_model.modules():
            weights = getattr(module, "network_weights_backup", None)
            bias = getattr(module, "network_bias_backup", None)
            merged = bool(getattr(module, "network_current_names", ()))
            if weights is None and bias is None and not merged:
                continue
            if weights is not None:
                if isinstance(module, nn.MultiheadAttention):
                    module.in_proj_weight.copy_(weights[0])
                    module.out_proj.weight.copy_(weights[1])
                else:
                    module.weight.copy_(weights)
            target = module.out_proj if isinstance(module, nn.MultiheadAttention) else module
            if bias is not None:
                target.bias.copy_(bias)
            elif weights is not None and hasattr(module, "network_bias_backup") and target.bias is not None:
                target.bias = None  # as the extension's own restore: the bias was added by a network
            module.network_current_names = ()
            restored += merged
    return restored


def list_lora(networks: Any, path: Path) -> None:
    """Add (or replace) the entry for the LoRA file ``path`` in the built-in Lora extension's list, in place.

    The extension's ``list_available_networks()`` first clears ``available_networks`` and then rebuilds it file by
    file, so whoever reads the list meanwhile (``/sdapi/v1/loras``, the Lora tab) sees it empty or partial. The
    WebUI, reForge and Forge Classic all build an entry with their own ``network.NetworkOnDisk(name, filename)``
    and register it under its name and alias, marking an alias that two files claim as forbidden; we do the same
    for this one file, so every other entry stays where it is. Without that class (another loader), it rescans.
    """
    on_disk = getattr(getattr(networks, "network", None), "NetworkOnDisk", None)
    listed = getattr(networks, "available_networks", None)
    aliases = getattr(networks, "available_network_aliases", None)
    forbidden = getattr(networks, "forbidden_network_aliases", None)
    if on_disk is None or not all(isinstance(d, dict) for d in (listed, aliases, forbidden)):
        rescan = getattr(networks, "list_available_networks", None)
        if rescan is not None:
            rescan()
        return
    name = path.stem
    entry = on_disk(name, str(path))
    replaced = listed.get(name)
    listed[name] = entry
    if replaced is not None:  # drop the replaced file's names; the new entry registers its own below
        for key in [key for key, value in aliases.items() if value is replaced]:
            del aliases[key]
    if entry.alias in aliases:
        forbidden[entry.alias.lower()] = 1
    aliases[name] = entry
    aliases[entry.alias] = entry
