"""Write a trained LoRA as the file every consumer reads: kohya keys, ss_* + modelspec metadata, sidecars.

The ss_* keys follow kohya sd-scripts' train_network.py so A1111's Lora cards, the Additional Networks
extension and civitai show the training details; sshs_* are the hashes the WebUI would otherwise compute.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data.dataset import Dataset
from lora_train.engine.files import atomic_write, atomic_write_text
from lora_train.engine.model import BASE_MODEL_VERSION, Family, Parameterization

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
_SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def addnet_hashes(tensors: dict[str, torch.Tensor], ss_metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precomputes them and A1111/addnet read them.

    The model hash covers the tensor bytes after the header, so it does not change with metadata; the
    legacy hash reads a fixed window of the file written with the ss_* keys only.
    """
    data = save(tensors, {k: v for k, v in ss_metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length :]).hexdigest()
    buffer = BytesIO(data)
    buffer.seek(0x100000)
    legacy_hash = hashlib.sha256(buffer.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def architecture(family: Family, parameterization: Parameterization) -> str:
    if family == "sd2":
        return "stable-diffusion-v2-768-v/lora" if parameterization == "v" else "stable-diffusion-v2-512/lora"
    return f"{_ARCHITECTURES[family]}/lora"


@dataclass(frozen=True)
class RunFacts:
    """The numbers of the run as it happened (not as configured): metadata and the WebUI's description use them.

    ``rank``/``alpha`` come from ``network_weights`` when that file set them, ``num_epochs`` from the steps
    actually planned (max_train_steps may end a run before ``epochs``), the learning rates from what the
    optimizer got (Prodigy: its base lr, the multiplier of its own estimate).
    """

    rank: int
    alpha: float
    learning_rate: float
    unet_lr: float
    text_encoder_lr: float | None
    num_epochs: int
    batches_per_epoch: int
    total_steps: int


def training_metadata(
    cfg: TrainConfig,
    dataset: Dataset,
    family: Family,
    parameterization: Parameterization,
    model_name: str,
    facts: RunFacts,
    steps: int,
    epoch: int,
    started_at: float,
) -> dict[str, str]:
    """kohya's ss_* keys plus modelspec.*; every value a string, as safetensors metadata requires."""
    height, width = cfg.resolution_hw
    values: dict[str, Any] = {
        "ss_session_id": str(int(started_at * 1000) % 2**31),
        "ss_training_started_at": started_at,
        "ss_training_finished_at": time.time(),
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": facts.learning_rate,
        "ss_unet_lr": facts.unet_lr,
        "ss_text_encoder_lr": facts.text_encoder_lr,
        "ss_num_train_images": dataset.num_train_images,
        "ss_num_reg_images": dataset.num_reg_images,
        "ss_num_batches_per_epoch": facts.batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": facts.total_steps,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": cfg.network.module,
        "ss_network_dim": facts.rank,
        "ss_network_alpha": facts.alpha,
        "ss_network_dropout": cfg.lora_dropout,
        "ss_network_args": json.dumps(cfg.network.metadata_args()),
        "ss_network_train_unet_only": not cfg.train_text_encoder,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": family == "sd2",
        "ss_v_parameterization": parameterization == "v",
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_clip_skip": cfg.clip_skip,  # the WebUI host fills in its own setting when unset
        "ss_max_token_length": cfg.max_token_length if cfg.max_token_length != 75 else None,
        "ss_cache_latents": cfg.cache_latents,
        "ss_seed": cfg.seed,
        "ss_noise_offset": cfg.noise_offset or None,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        **noise_and_loss_metadata(cfg),
        "ss_zero_terminal_snr": bool(cfg.zero_terminal_snr),  # the WebUI host fills in its own setting when unset
        "ss_scale_v_pred_loss_like_noise_pred": cfg.scale_v_pred_loss_like_noise_pred,
        "ss_v_pred_like_loss": cfg.v_pred_like_loss,
        "ss_optimizer": cfg.optimizer + (f"({cfg.optimizer_args})" if cfg.optimizer_args else ""),
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_resolution": f"({width}, {height})",
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_bucket_no_upscale": False,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs()),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(b)} for i, b in
                                                  enumerate(dataset.buckets)}}),
        "ss_sd_model_name": model_name,
        "ss_training_comment": cfg.training_comment,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture(family, parameterization),
        "modelspec.implementation": (
            "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers"
        ),
        "modelspec.title": cfg.output_name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(started_at)).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if parameterization == "v" else "epsilon",
        "modelspec.trigger_phrase": cfg.trigger_word,
        "modelspec.timestep_range": timestep_range(cfg),
    }
    return {key: str(value) for key, value in values.items() if value is not None}


def noise_and_loss_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """kohya's ss_* keys for its noise and loss options, spelled and valued as train_network.py writes them
    (kohya writes nothing for masked loss; ss_masked_loss / ss_alpha_mask are ours, written only when on)."""
    masked = cfg.masked_loss or cfg.alpha_mask
    return {
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations or None,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma or None,
        "ss_ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
        "ss_debiased_estimation": cfg.debiased_estimation_loss,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_c": cfg.huber_c,
        "ss_huber_scale": cfg.huber_scale,
        "ss_masked_loss": True if masked else None,
        "ss_alpha_mask": True if cfg.alpha_mask else None,
    }


def timestep_range(cfg: TrainConfig) -> str | None:
    """modelspec.timestep_range as kohya's sai_model_spec writes it ("min,max"), when either end is set."""
    if cfg.min_timestep is None and cfg.max_timestep is None:
        return None
    low = 0 if cfg.min_timestep is None else cfg.min_timestep
    return f"{low},{1000 if cfg.max_timestep is None else cfg.max_timestep}"


def validation_metadata(cfg: TrainConfig, held_out: int, points: list[tuple[int, float]]) -> dict[str, str]:
    """kohya's validation keys (train_network.py writes them in every file), plus the curve so far and its best
    point under ``lora_train_validation`` (kohya keeps losses only in its logs)."""
    values: dict[str, Any] = {
        "ss_num_validation_images": held_out,
        "ss_validation_seed": cfg.validation_seed,
        "ss_validation_split": cfg.validation_split,
        "ss_max_validation_steps": cfg.max_validation_steps,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_validate_every_n_steps": cfg.validate_every_n_steps,
    }
    if points:
        best_step, best_loss = min(points, key=lambda p: p[1])
        values["lora_train_validation"] = json.dumps(
            {"best_step": best_step, "best_loss": best_loss, "points": [[s, round(v, 6)] for s, v in points]})
    return {key: str(value) for key, value in values.items() if value is not None}


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomically write the .safetensors with sshs_* hashes added to ``metadata``."""
    model_hash, legacy_hash = addnet_hashes(tensors, metadata)
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata))


def write_sidecar(path: Path, family: Family, trigger: str | None, description: str, weight: float = 0.8) -> Path:
    """``<name>.json`` the WebUI's Lora card reads: activation text, preferred weight, SD version."""
    card = {
        "description": description,
        "sd version": _SD_VERSION[family],
        "activation text": trigger or "",
        "preferred weight": weight,
        "negative text": "",
        "notes": "Trained with sd-webui-lora-train.",
    }
    return atomic_write_text(path.with_suffix(".json"), json.dumps(card, indent=4, ensure_ascii=False))


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    """A LoRA file's metadata from its header alone (no tensors loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file (for inspect, network_weights and tests)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata
