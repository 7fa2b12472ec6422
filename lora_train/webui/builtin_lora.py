"""Undo the WebUI's built-in Lora extension before training: WebUI knowledge, so it lives beside the adapter.

The extension merges LoRA deltas into the live model in place; training on those weights would bake someone
else's LoRA into ours. Duck-typed over ``nn.Module`` attributes, so it needs no A1111 import and tests run anywhere.
"""

from __future__ import annotations

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
    they are the originals and the extension reuses them. Returns the number of modules restored.
    """
    if loaded_networks is not None:
        loaded_networks.clear()
    restored = 0
    with torch.no_grad():
        for module in sd_model.modules():
            weights = getattr(module, "network_weights_backup", None)
            bias = getattr(module, "network_bias_backup", None)
            if weights is None and bias is None and not getattr(module, "network_current_names", ()):
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
            restored += 1
    return restored
