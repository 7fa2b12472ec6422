"""Single-file (A1111/LDM layout) checkpoint → diffusers/transformers state dicts, offline.

UNet and VAE go through diffusers' own converters. The text encoders are converted here: diffusers moved
and re-signed those helpers between 0.26 and 0.42 (and some fetch a hub config), while the CLIP/OpenCLIP
key mapping itself is short and has not changed since SD2.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_train.engine.model import Family
from lora_train.engine.output import weight_kinds
from lora_train.engine.output.weights import StreamedTensors, WeightsFileError

try:  # diffusers >= 0.28 moved the module
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
except ImportError:  # pragma: no cover - depends on the installed diffusers
    from diffusers.loaders.single_file.single_file_utils import (  # type: ignore[no-redef]
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

_CLIP_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
_OPEN_CLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
_RESBLOCK_RENAMES = (
    ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
)


def read_state_dict(path: Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    ) -> tuple[MutableMapping[str, torch.Tensor], Family]:
    """The tensors of a .safetensors or .ckpt file (``state_dict`` unwrapped, no pickled code run), read one by
    one as they are asked for and converted to ``dtype`` on ``device`` (see StreamedTensors), and their family.

    Anything that is not an SD1/SD2/SDXL checkpoint raises one WeightsFileError naming the file.
    """
    state = StreamedTensors(path, dtype, device)
    return state, weight_kinds.require_checkpoint(path, state.shapes, {})


def yaml_says_v(path: Path) -> bool:
    """A1111's convention: ``model.yaml`` beside ``model.safetensors`` with ``parameterization: "v"``."""
    config = path.with_suffix(".yaml")
    pattern = r"parameterization:\s*['\"]?v['\"]?\s*$"
    return config.is_file() and re.search(pattern, config.read_text(), re.M) is not None


def unet_state(state: Mapping[str, torch.Tensor], config: Any, path: Path) -> dict[str, torch.Tensor]:
    return converted(path, "UNet", convert_ldm_unet_checkpoint, state, config)


def vae_state(state: Mapping[str, torch.Tensor], config: Any, path: Path) -> dict[str, torch.Tensor]:
    return converted(path, "VAE", convert_ldm_vae_checkpoint, state, config)


def converted(path: Path, what: str, convert: Callable[..., dict[str, torch.Tensor]], *args: Any):
    """``convert(*args)``, with a missing or odd key reported as one line naming the file and the part."""
    try:
        return convert(*args)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise WeightsFileError(
            f"{path}: the {what} weights do not have the layout of an SD checkpoint ({type(exc).__name__}: "
            f"{str(exc)[:120]}); the file is damaged or a model of another architecture"
        ) from None


def text_encoder_state(
    state: Mapping[str, torch.Tensor], family: Family, index: int, layers: int
) -> dict[str, torch.Tensor]:
    """HF CLIP state dict for text encoder ``index`` of a family (OpenAI CLIP copied, OpenCLIP renamed); only
    its own keys are read from ``state``."""
    if family == "sd1" or (family == "sdxl" and index == 0):
        prefix = _CLIP_PREFIXES[family]
        out = {k[len(prefix):]: state[k] for k in list(state) if k.startswith(prefix)}
        if out and not any(k.startswith("text_model.") for k in out):  # very old checkpoints
            out = {"text_model." + k: v for k, v in out.items()}
        out.pop("text_model.embeddings.position_ids", None)
        return out
    return _open_clip_to_hf(state, _OPEN_CLIP_PREFIXES[family], layers)


def _open_clip_to_hf(state: Mapping[str, torch.Tensor], prefix: str, layers: int) -> dict[str, torch.Tensor]:
    out = {
        "text_model.embeddings.token_embedding.weight": state[prefix + "token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state[prefix + "positional_embedding"],
        "text_model.final_layer_norm.weight": state[prefix + "ln_final.weight"],
        "text_model.final_layer_norm.bias": state[prefix + "ln_final.bias"],
    }
    if prefix + "text_projection" in state:
        out["text_projection.weight"] = state[prefix + "text_projection"].T.contiguous()
    block = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$")
    for key in list(state):
        m = block.match(key)
        if not m or int(m.group(1)) >= layers:  # SD2 drops the last block: it uses the penultimate layer
            continue
        value = state[key]
        base = f"text_model.encoder.layers.{m.group(1)}."
        rest = m.group(2)
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[-1]  # weight | bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{base}self_attn.{name}.{kind}"] = part
            continue
        for old, new in _RESBLOCK_RENAMES:
            rest = rest.replace(old, new)
        out[base + rest] = value
    return out


def load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Assign converted weights into an empty (meta) module, naming the file and part on a mismatch."""
    expected = module.state_dict()
    if not any(k.startswith("text_model.") for k in expected):  # transformers 5 dropped CLIP's text_model level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    # position_ids is a buffer some transformers versions keep and others drop
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise WeightsFileError(f"{path}: the {what} weights are incomplete, e.g. missing {missing[:3]}")
    for key in [k for k in state if k not in expected]:
        state.pop(key)
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise WeightsFileError(f"{path}: {len(wrong)} {what} tensor(s) have other shapes than this architecture's, "
                               f"e.g. {wrong[0]}; the file is damaged or not a standard SD1/SD2/SDXL model")
    module.load_state_dict(state, strict=False, assign=True)
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:  # position_ids when the file lacked it
            owner = module.get_submodule(name.rpartition(".")[0])
            owner.register_buffer(name.rpartition(".")[2], torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                  persistent=False)
