"""DoRA as the WebUI applies a file's ``dora_scale``: a magnitude per INPUT column of the merged weight.

Hand-written because peft's DoRA (``use_dora``) keeps its magnitude per OUTPUT row, and a file trained that
way would be applied wrongly by A1111/Forge/ComfyUI, whose ``apply_weight_decompose`` normalises
``W + ΔW`` over every axis but the input one (``dora_scale`` of shape [1, in] or [1, in, 1, 1]). The low-rank
part stays peft's LoRA layer; this module only rescales its merged weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of ``weight``, shaped [1, in(, 1, 1)] like the WebUI's."""
    columns = weight.shape[1]
    norm = weight.transpose(0, 1).reshape(columns, -1).norm(dim=1, keepdim=True)
    return norm.reshape(columns, *[1] * (weight.dim() - 1)).transpose(0, 1)


class DoraLayer(nn.Module):
    """A peft LoRA layer whose merged weight ``W + ΔW`` is renormalised to the learned ``dora_scale``."""

    def __init__(self, lora_layer: BaseTunerLayer, adapter: str):
        super().__init__()
        self.lora = lora_layer
        self.adapter = adapter
        weight = self.get_base_layer().weight.detach().float()
        self.dora_scale = nn.Parameter(column_norm(weight))  # starts at the host's own norms: no change

    def get_base_layer(self) -> nn.Module:
        return self.lora.get_base_layer()

    def merged_weight(self) -> torch.Tensor:
        merged = self.get_base_layer().weight.float() + self.lora.get_delta_weight(self.adapter).float()
        return merged * (self.dora_scale / column_norm(merged))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``args``: what diffusers passes its LoRA-compatible layers (a scale), which this layer ignores."""
        base = self.get_base_layer()
        weight = self.merged_weight().to(x.dtype)
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)
