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
# OpenCLIP's text transformer (SD2, SDXL's bigG in the WebUI), with q/k/v split (network/fused_attention)
_OPEN_CLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.(?:q|k|v|out)_proj|mlp\.c_fc|mlp\.c_proj)$")
_OPEN_CLIP_TO_HF = {"attn": "self_attn", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

# LoCon's extra targets (kohya's conv_dim: every Linear/Conv2d of ResnetBlock2D, Downsample2D, Upsample2D).
_RESNET_TO_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
                  "time_emb_proj": "emb_layers.1"}
_RESNET_TO_DIFFUSERS = {ldm: diffusers for diffusers, ldm in _RESNET_TO_LDM.items()}
_RESNET_PART = "|".join(re.escape(name) for name in (*_RESNET_TO_LDM, *_RESNET_TO_DIFFUSERS))
_DIFFUSERS_CONV = re.compile(rf"^(?:(?:down|up)_blocks\.\d+\.|mid_block\.)resnets\.\d+\.({_RESNET_PART})$"
                             r"|^(?:down_blocks\.\d+\.downsamplers|up_blocks\.\d+\.upsamplers)\.0\.conv$")
_LDM_CONV = re.compile(rf"^(?:(?:input|output)_blocks\.\d+\.0|middle_block\.[02])\.({_RESNET_PART})$"
                       r"|^input_blocks\.\d+\.0\.op$|^output_blocks\.\d+\.[12]\.conv$")

_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$")
_DIFFUSERS_MID = re.compile(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.+)$")
_DIFFUSERS_SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(?:downsamplers|upsamplers)\.0\.conv$")
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.([01])\.(.+)$")
_LDM_MID = re.compile(r"^middle_block\.([012])\.(.+)$")
_LDM_TRANSFORMER = re.compile(r"^(?:input_blocks\.\d+|output_blocks\.\d+|middle_block)\.1\.")


def is_unet_target(path: str) -> bool:
    """True for the Linear/1x1-Conv modules kohya wraps inside a UNet transformer block."""
    in_transformer = ".attentions." in path or _LDM_TRANSFORMER.match(path) is not None
    return in_transformer and any(path.endswith("." + suffix) for suffix in UNET_TARGET_SUFFIXES)


def is_unet_conv_target(path: str) -> bool:
    """True for the ResNet-block and down/upsampler layers LoCon adds (3x3 convs, 1x1 shortcuts, time proj)."""
    return _DIFFUSERS_CONV.match(path) is not None or _LDM_CONV.match(path) is not None


def diffusers_to_ldm(path: str, layers_per_block: int, up_attention: frozenset[int] = frozenset()) -> str:
    """``down_blocks.1.attentions.0.X`` → ``input_blocks.4.1.X`` (and the resnet, sampler, up/mid equivalents).

    ``up_attention``: the up blocks that have attentions, whose upsampler sits one module further on.
    """
    per_block = layers_per_block + 1
    if m := _DIFFUSERS_MID.match(path):
        kind, index, rest = m.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(index)}.{_RESNET_TO_LDM.get(rest, rest)}"
    if m := _DIFFUSERS_SAMPLER.match(path):
        block = int(m.group(2))
        if m.group(1) == "down_blocks":
            return f"input_blocks.{(block + 1) * per_block}.0.op"
        return f"output_blocks.{block * per_block + layers_per_block}.{2 if block in up_attention else 1}.conv"
    m = _DIFFUSERS_BLOCK.match(path)
    if not m:
        raise ValueError(f"not a UNet block path: {path}")
    kind, block, part, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    sub = "1" if part == "attentions" else "0"
    rest = rest if part == "attentions" else _RESNET_TO_LDM.get(rest, rest)
    if kind == "down_blocks":
        return f"input_blocks.{1 + block * per_block + index}.{sub}.{rest}"
    return f"output_blocks.{block * per_block + index}.{sub}.{rest}"


def ldm_to_diffusers(path: str, layers_per_block: int) -> str:
    """Inverse of ``diffusers_to_ldm``."""
    per_block = layers_per_block + 1
    if m := _LDM_MID.match(path):
        index, rest = int(m.group(1)), m.group(2)
        if index == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{index // 2}.{_RESNET_TO_DIFFUSERS.get(rest, rest)}"
    if m := re.match(r"^input_blocks\.(\d+)\.0\.op$", path):
        return f"down_blocks.{int(m.group(1)) // per_block - 1}.downsamplers.0.conv"
    if m := re.match(r"^output_blocks\.(\d+)\.[12]\.conv$", path):
        return f"up_blocks.{int(m.group(1)) // per_block}.upsamplers.0.conv"
    m = _LDM_BLOCK.match(path)
    if not m:
        raise ValueError(f"not a UNet block path: {path}")
    kind, number, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    part = "attentions" if sub == "1" else "resnets"
    rest = rest if sub == "1" else _RESNET_TO_DIFFUSERS.get(rest, rest)
    if kind == "input_blocks":
        block, index = divmod(number - 1, per_block)
        return f"down_blocks.{block}.{part}.{index}.{rest}"
    block, index = divmod(number, per_block)
    return f"up_blocks.{block}.{part}.{index}.{rest}"


def unet_key(path: str, family: Family, layout: UnetLayout, layers_per_block: int = 2,
             up_attention: frozenset[int] = frozenset()) -> str:
    """kohya key of a UNet module, whichever layout the live model uses."""
    wanted: UnetLayout = "ldm" if family == "sdxl" else "diffusers"
    if layout != wanted:
        path = diffusers_to_ldm(path, layers_per_block, up_attention) if wanted == "ldm" else ldm_to_diffusers(
            path, layers_per_block
        )
    return "lora_unet_" + path.replace(".", "_")


def text_encoder_key(path: str, family: Family, index: int) -> str | None:
    """kohya key of a CLIP layer, from the layer number and role alone.

    Works for any wrapper around the CLIP model (transformers 5 dropped ``text_model``), returning None for
    modules kohya does not target.
    """
    m = _TE_LAYER.search(path)
    if m:
        layer, role = m.groups()
    elif m := _OPEN_CLIP_LAYER.match(path):
        layer, role = m.group(1), m.group(2)
        role = _OPEN_CLIP_TO_HF.get(role) or role.replace("attn.", "self_attn.")
    else:
        return None
    prefix = f"lora_te{index + 1}" if family == "sdxl" else "lora_te"
    return f"{prefix}_text_model_encoder_layers_{layer}_{role.replace('.', '_')}"


def find_targets(
    unet: nn.Module, text_encoders: list[nn.Module], family: Family, layout: UnetLayout, layers_per_block: int,
    text_encoder: bool, conv: bool = False,
) -> list[LoraTarget]:
    """Every module kohya's LoRA wraps in a live model, with its kohya key (shared by all hosts).

    ``conv`` adds the ResNet blocks and down/upsamplers, as kohya does when ``conv_dim`` is set (LoCon).
    """
    names = [name for name, _ in unet.named_modules()]
    up_attention = frozenset(int(n.split(".")[1]) for n in names if re.match(r"^up_blocks\.\d+\.attentions\.", n))
    targets = [
        LoraTarget(unet, name, unet_key(name, family, layout, layers_per_block, up_attention))
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and (is_unet_target(name) or conv and is_unet_conv_target(name))
    ]
    if text_encoder:
        for index, encoder in enumerate(text_encoders):
            for name, module in encoder.named_modules():
                key = text_encoder_key(name, family, index)
                if key and isinstance(module, nn.Linear):
                    targets.append(LoraTarget(encoder, name, key))
    return targets
