"""Module paths ↔ the key names kohya sd-scripts writes, for both UNet layouts.

Hand-written because no library exposes this mapping as a function: diffusers only converts whole state
dicts, and A1111 only resolves the other way (key → live module). The rules follow kohya's networks/lora.py:
``prefix + "_" + module_path.replace(".", "_")``, with SD1/SD2 UNet paths in diffusers block names and SDXL
UNet paths in the original input_blocks/middle_block/output_blocks names.
"""

from __future__ import annotations

import re

from torch import nn

from lora_train.engine.model import Family, LoraTarget, UnetLayout

# kohya's default targets inside a UNet transformer (Transformer2DModel / SpatialTransformer).
UNET_TARGET_SUFFIXES = (
    "proj_in", "proj_out",
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
_TE_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")

_DIFFUSERS_ATTN = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")
_DIFFUSERS_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_LDM_ATTN = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(.+)$")
_LDM_MID = re.compile(r"^middle_block\.1\.(.+)$")
_LDM_TRANSFORMER = re.compile(r"^(?:input_blocks\.\d+|output_blocks\.\d+|middle_block)\.1\.")


def is_unet_target(path: str) -> bool:
    """True for the Linear/1x1-Conv modules kohya wraps inside a UNet transformer block."""
    in_transformer = ".attentions." in path or _LDM_TRANSFORMER.match(path) is not None
    return in_transformer and any(path.endswith("." + suffix) for suffix in UNET_TARGET_SUFFIXES)


def diffusers_to_ldm(path: str, layers_per_block: int) -> str:
    """``down_blocks.1.attentions.0.X`` → ``input_blocks.4.1.X`` (and the up/mid equivalents)."""
    if m := _DIFFUSERS_MID.match(path):
        return f"middle_block.1.{m.group(1)}"
    m = _DIFFUSERS_ATTN.match(path)
    if not m:
        raise ValueError(f"not a UNet attention path: {path}")
    kind, block, index, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "down_blocks":
        return f"input_blocks.{1 + block * (layers_per_block + 1) + index}.1.{rest}"
    return f"output_blocks.{block * (layers_per_block + 1) + index}.1.{rest}"


def ldm_to_diffusers(path: str, layers_per_block: int) -> str:
    """Inverse of ``diffusers_to_ldm``."""
    if m := _LDM_MID.match(path):
        return f"mid_block.attentions.0.{m.group(1)}"
    m = _LDM_ATTN.match(path)
    if not m:
        raise ValueError(f"not a UNet attention path: {path}")
    kind, number, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == "input_blocks":
        block, index = divmod(number - 1, layers_per_block + 1)
        return f"down_blocks.{block}.attentions.{index}.{rest}"
    block, index = divmod(number, layers_per_block + 1)
    return f"up_blocks.{block}.attentions.{index}.{rest}"


def unet_key(path: str, family: Family, layout: UnetLayout, layers_per_block: int = 2) -> str:
    """kohya key of a UNet module, whichever layout the live model uses."""
    wanted: UnetLayout = "ldm" if family == "sdxl" else "diffusers"
    if layout != wanted:
        path = diffusers_to_ldm(path, layers_per_block) if wanted == "ldm" else ldm_to_diffusers(
            path, layers_per_block
        )
    return "lora_unet_" + path.replace(".", "_")


def text_encoder_key(path: str, family: Family, index: int) -> str | None:
    """kohya key of a CLIP layer, from the layer number and role alone.

    Works for any wrapper around the CLIP model (transformers 5 dropped ``text_model``), returning None for
    modules kohya does not target.
    """
    m = _TE_LAYER.search(path)
    if not m:
        return None
    prefix = f"lora_te{index + 1}" if family == "sdxl" else "lora_te"
    return f"{prefix}_text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"


def find_targets(
    unet: nn.Module, text_encoders: list[nn.Module], family: Family, layout: UnetLayout, layers_per_block: int,
    text_encoder: bool,
) -> list[LoraTarget]:
    """Every module kohya's default LoRA wraps in a live model, with its kohya key (shared by all hosts)."""
    targets = [
        LoraTarget(unet, name, unet_key(name, family, layout, layers_per_block))
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and is_unet_target(name)
    ]
    if text_encoder:
        for index, encoder in enumerate(text_encoders):
            for name, module in encoder.named_modules():
                key = text_encoder_key(name, family, index)
                if key and isinstance(module, nn.Linear):
                    targets.append(LoraTarget(encoder, name, key))
    return targets
