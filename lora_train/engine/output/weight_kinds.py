"""What a weights file is, from its tensor names and shapes alone: an SD1/SD2/SDXL checkpoint, a LoRA for some
of those families, or something else (a VAE, an embedding, a diffusers UNet file).

Shapes come from ``weights.read_header`` (no tensor data loaded), so a wrong file is named before any model is
built. Diffusers-free: the WebUI path uses it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lora_train.engine.model import Family
from lora_train.engine.output.weights import WeightsFileError

Shapes = Mapping[str, Sequence[int]]
FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
ALL_FAMILIES: frozenset[Family] = frozenset(("sd1", "sd2", "sdxl"))

_SD2_PROBE = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
# cross-attention width of the UNet (what attn2.to_k reads) per family
_CONTEXT_WIDTH: dict[int, Family] = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_SD12_UNET_PREFIXES = ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_",
                       "lora_unet_input_blocks_1_", "lora_unet_input_blocks_2_")  # SDXL has no attention there
_SD_UNET_PREFIXES = tuple(f"lora_unet_{block}_" for block in (
    "down_blocks", "up_blocks", "mid_block", "input_blocks", "middle_block", "output_blocks"))


def family_names(families: frozenset[Family]) -> str:
    """Display names joined with "/" (e.g. SD1/SD2), or what to call a LoRA that fits none of our families."""
    return "/".join(FAMILY_NAMES[f] for f in sorted(families)) or "another architecture, e.g. Flux or SD3"


def checkpoint_family(shapes: Shapes) -> Family | None:
    """SDXL has a second (OpenCLIP) embedder; SD2 cross-attends to 1024-wide text features; else SD1.

    None when the file is not an SD1/SD2/SDXL checkpoint (see ``describe``).
    """
    if any(key.startswith("conditioner.embedders.1.model.") for key in shapes):
        return "sdxl"
    if not any(key.startswith("model.diffusion_model.") for key in shapes) or _is_refiner(shapes):
        return None
    probe = shapes.get(_SD2_PROBE)
    if probe is not None and probe[-1] == 1024 or any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"
    return "sd1"


def _is_refiner(shapes: Shapes) -> bool:
    return any(key.startswith("conditioner.embedders.0.model.") for key in shapes)


def is_kohya_lora(shapes: Shapes) -> bool:
    return any(key.startswith(("lora_unet_", "lora_te")) for key in shapes)


# a module's tensor names that say which network type wrote it (kohya's LoRA/LoCon, LyCORIS' LoHa/LoKr)
_TYPE_MARKERS = ((".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr"), (".lokr_w1_a", "LoKr"), (".lora_down.weight", "LoRA"))


def network_type(shapes: Shapes) -> str | None:
    """LoRA, LoCon (3x3 convolutions too), LoHa, LoKr, or DoRA (any of them with ``dora_scale``); None when the
    file holds none of their keys. Mixed files are named by the first type found."""
    kind = next((name for marker, name in _TYPE_MARKERS if any(key.endswith(marker) for key in shapes)), None)
    if kind == "LoRA" and any(key.endswith(".lora_down.weight") and tuple(shape[2:]) not in ((), (1, 1))
                              for key, shape in shapes.items()):
        kind = "LoCon"
    if kind and any(key.endswith(".dora_scale") for key in shapes):
        kind = "DoRA" if kind == "LoRA" else f"DoRA ({kind})"
    return kind


def lora_families(shapes: Shapes, metadata: Mapping[str, str]) -> frozenset[Family]:
    """The families a kohya LoRA can belong to: from its metadata, else its key layout, else its widths.

    Empty for a LoRA of another architecture (Flux, SD3: other base-model versions or UNet block names).
    """
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if version.startswith(prefix):
            return frozenset((family,))
    if version:
        return frozenset()
    if metadata.get("ss_v2") == "True":
        return frozenset(("sd2",))
    modules = {key.split(".")[0] for key in shapes}
    if any(m.startswith("lora_unet_") and not m.startswith(_SD_UNET_PREFIXES) for m in modules):
        return frozenset()
    if any(m.startswith(("lora_te1_", "lora_te2_")) for m in modules):
        return frozenset(("sdxl",))
    for key, shape in shapes.items():
        if key.endswith(("attn2_to_k.lora_down.weight", "attn2_to_v.lora_down.weight", "attn2_to_k.hada_w1_b",
                         "attn2_to_v.hada_w1_b")) and len(shape) > 1:
            if shape[1] in _CONTEXT_WIDTH:
                return frozenset((_CONTEXT_WIDTH[shape[1]],))
    if any(m.startswith(("lora_te_", *_SD12_UNET_PREFIXES)) for m in modules):
        return frozenset(("sd1", "sd2"))
    return ALL_FAMILIES


def describe(shapes: Shapes, metadata: Mapping[str, str]) -> str:
    """A few words saying what the file holds, for "X is <this>, not what was asked for" messages."""
    family = checkpoint_family(shapes)
    if family is not None:
        return f"a full {FAMILY_NAMES[family]} checkpoint"
    if _is_refiner(shapes):
        return "an SDXL refiner checkpoint (no LoRA training on the refiner)"
    if is_kohya_lora(shapes):
        kind = network_type(shapes)
        if kind is None:
            return "a LyCORIS network of a type we do not train (e.g. IA3, GLoRA, OFT)"
        return f"a {kind} ({family_names(lora_families(shapes, metadata))})"
    keys = list(shapes)
    if any(".lora_A." in key or ".lora.down." in key or ".lora_linear_layer." in key for key in keys):
        return "a LoRA in diffusers/peft format (we read kohya-format LoRAs)"
    if any(key.startswith(("encoder.down", "first_stage_model.")) for key in keys) and not any(
        "diffusion_model" in key or key.startswith("down_blocks.") for key in keys
    ):
        return "a VAE"
    if any(key.startswith("down_blocks.") for key in keys) and "conv_in.weight" in shapes:
        return "a diffusers UNet file (give the whole diffusers folder instead)"
    if any(key in shapes for key in ("emb_params", "clip_l", "clip_g")):
        return "a textual-inversion embedding"
    if not shapes:
        return "an empty weights file"
    return f"not a Stable Diffusion file (first tensor: {keys[0]!r})"


def require_checkpoint(path: object, shapes: Shapes, metadata: Mapping[str, str]) -> Family:
    """The checkpoint's family, or one WeightsFileError saying what the file is instead."""
    family = checkpoint_family(shapes)
    if family is None:
        hint = " (LoRA files go in network_weights)" if is_kohya_lora(shapes) else ""
        raise WeightsFileError(
            f"{path} is {describe(shapes, metadata)}, not a Stable Diffusion checkpoint{hint}; base_model takes an "
            "SD1/SD2/SDXL checkpoint (.safetensors/.ckpt) or a diffusers folder"
        )
    return family
