"""OpenCLIP's fused attention as kohya's separate q/k/v modules, for the length of a training run.

SD2's and SDXL's OpenCLIP text encoders hold q, k and v as one ``nn.MultiheadAttention.in_proj_weight``
[3d, d]; kohya files (and the WebUI, Forge and ComfyUI loaders) address them as ``self_attn_q_proj``,
``_k_proj`` and ``_v_proj``, each a LoRA on its row block of that weight (the WebUI's ``networks.py`` stacks
their three updates onto ``in_proj_weight``). ``split`` gives one attention module three Linear children whose
weights are *views* of those row blocks (nothing copied, the host's tensor untouched) and an instance
``forward`` that computes the same attention through them, so a LoRA wraps each like any Linear. ``undo``
removes the children and the override; the module is then exactly what it was.

Written by hand because torch's MultiheadAttention reads ``in_proj_weight`` inside one fused functional call
that no per-module LoRA (peft's included) can reach.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

PARTS = ("q_proj", "k_proj", "v_proj")


def _view_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear on the meta device whose parameters are then replaced by frozen views (no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
    return linear


def _forward(attention: nn.MultiheadAttention) -> Callable[..., tuple[torch.Tensor, None]]:
    heads = attention.num_heads

    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if key_padding_mask is not None:
            raise NotImplementedError("key_padding_mask is not used by OpenCLIP's text encoder")
        if not attention.batch_first:  # [L, N, E] -> [N, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, width = query.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, -1, heads, width // heads).transpose(1, 2)

        q = split_heads(attention.q_proj(query))
        k = split_heads(attention.k_proj(key))
        v = split_heads(attention.v_proj(value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # MultiheadAttention: True = masked out; scaled_dot_product_attention: kept
        elif attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None)
        out = attention.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return (out if attention.batch_first else out.transpose(0, 1)), None

    return forward


def split(attention: nn.MultiheadAttention) -> Callable[[], None]:
    """Give ``attention`` q_proj/k_proj/v_proj children over its in_proj row blocks; returns the undo."""
    if not attention._qkv_same_embed_dim or attention.in_proj_weight is None:
        raise ValueError("only attention with one fused in_proj weight (OpenCLIP's) can be split")
    weights = attention.in_proj_weight.detach().chunk(3, dim=0)
    biases = attention.in_proj_bias.detach().chunk(3) if attention.in_proj_bias is not None else (None,) * 3
    for name, weight, bias in zip(PARTS, weights, biases, strict=True):
        setattr(attention, name, _view_linear(weight, bias))
    attention.forward = _forward(attention)

    def undo() -> None:
        for name in PARTS:
            if name in attention._modules:
                del attention._modules[name]
        attention.__dict__.pop("forward", None)

    return undo
