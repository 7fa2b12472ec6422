"""Find, check and build the open_clip CoCa model's weights (read from a local file only).

A file that is not on this machine is downloaded on first use when allowed (``download_weights``); otherwise
WeightsMissingError says which file to get and where to put it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_train.caption.defaults import DEFAULT_MODEL
from lora_train.caption.download import hub_file
from lora_train.caption.errors import CaptionerError, WeightsMissingError
from lora_train.engine.output.weights import WeightsFileError, load_tensors

WEIGHT_FILE_NAMES = ("open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
# open_clip pretrained tag and its hub repository for the CoCa models we know.
PRETRAINED = {
    "coca_ViT-L-14": ("mscoco_finetuned_laion2B-s13B-b90k", "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k"),
    "coca_ViT-B-32": ("mscoco_finetuned_laion2B-s13B-b90k", "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k"),
}


def weight_candidates(model_name: str, models_dir: str | Path) -> list[Path]:
    """Where a models folder may hold the weights, in search order."""
    models_dir = Path(models_dir)
    in_subfolder = [models_dir / model_name / name for name in WEIGHT_FILE_NAMES]
    beside = [models_dir / f"{model_name}{suffix}" for suffix in (".safetensors", ".bin", ".pt")]
    return in_subfolder + beside + [models_dir / name for name in WEIGHT_FILE_NAMES]


def missing_weights_message(model_name: str, models_dir: str | Path | None, weights: str | Path | None) -> str:
    """Tell the user which file to get and where to put it."""
    tag, repo = PRETRAINED.get(model_name, ("<pretrained tag>", "<hub repository>"))
    where = (
        f"put it at {Path(models_dir) / model_name / WEIGHT_FILE_NAMES[1]} (or .safetensors)"
        if models_dir
        else "pass its path with --weights"
    )
    head = f"CoCa weights not found at {weights}." if weights else f"CoCa weights for {model_name} not found."
    return (
        f"{head} Get open_clip's pretrained '{tag}' for {model_name}: the file {WEIGHT_FILE_NAMES[1]} "
        f"(or {WEIGHT_FILE_NAMES[0]}) from https://huggingface.co/{repo} and {where}."
    )


def find_weights(model_name: str, weights: str | Path | None = None, models_dir: str | Path | None = None) -> Path:
    """Resolve the weights file: an explicit path must exist; else search ``models_dir``."""
    if weights is not None:
        path = Path(weights)
        if path.is_file():
            return path
        raise WeightsMissingError(missing_weights_message(model_name, models_dir, path))
    if models_dir is not None:
        for path in weight_candidates(model_name, models_dir):
            if path.is_file():
                return path
    raise WeightsMissingError(missing_weights_message(model_name, models_dir, None))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch pickle (weights only), unwrapping common containers."""
    path = Path(path)
    try:
        state = load_tensors(path)
    except WeightsFileError as exc:  # corrupt or truncated download: says which file, not a pickle traceback
        raise CaptionerError(str(exc)) from None
    if not isinstance(state, dict) or not state:
        raise CaptionerError(f"{path} holds no state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def check_matches(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, model_name: str) -> None:
    """One line when a weights file is not this model's (torch would list every key, tens of KB of them)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong):
        return
    counts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
              ((missing, "missing"), (unexpected, "unexpected"), (wrong, "of another shape")) if keys]
    tag, repo = PRETRAINED.get(model_name, ("<pretrained tag>", "<hub repository>"))
    raise CaptionerError(
        f"{path} is not open_clip {model_name} weights: of {len(expected)} tensors, {'; '.join(counts)}; "
        f"use the '{tag}' weights from https://huggingface.co/{repo}"
    )


def build_model(model_name: str = DEFAULT_MODEL, model_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """An uninitialised CoCa: from ``model_config`` (open_clip json layout) or open_clip's named config."""
    import open_clip
    from open_clip.coca_model import CoCa

    if model_config is not None:
        cfg = {k: v for k, v in model_config.items() if k not in ("custom_text", "preprocess_cfg")}
        return CoCa(**cfg)
    if model_name not in open_clip.list_models():
        raise CaptionerError(f"Unknown open_clip model {model_name!r}; CoCa models: {coca_models()}")
    return open_clip.create_model(model_name, pretrained=None)


def coca_models() -> list[str]:
    import open_clip

    return [name for name in open_clip.list_models() if name.startswith("coca")]



def download_weights(model_name: str, models_dir: str | Path | None, allow_download: bool) -> Path:
    """open_clip's pretrained weights for a known CoCa: into ``models_dir/<model>/`` (else the hub cache) on first
    use; offline, or with downloads off, a WeightsMissingError that names the file and where to get it."""
    if model_name not in PRETRAINED:
        raise WeightsMissingError(missing_weights_message(model_name, models_dir, None))
    tag, repo = PRETRAINED[model_name]
    folder = Path(models_dir) / model_name if models_dir else None
    return hub_file(repo, WEIGHT_FILE_NAMES[1], folder, allow_download, f"CoCa weights for {model_name} ('{tag}')")
