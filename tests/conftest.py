"""Shared fixtures: tiny models built in-process, sample datasets in tmp folders. Never touches the network."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# the dataset doctor's probe cache (CLI runs, also in subprocesses): a throwaway folder, never ~/.cache
os.environ["LORA_TRAIN_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora-train-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from lora_train.engine.config.settings import TrainConfig  # noqa: E402
from lora_train.hosts.diffusers import DiffusersBundle, load_bundle  # noqa: E402

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "lora_train" / "sample_data"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def _tiny_models() -> dict[str, DiffusersBundle]:
    return {name: load_bundle(name) for name in ("tiny", "tiny-sdxl")}


@pytest.fixture
def tiny(_tiny_models) -> DiffusersBundle:
    """A private copy of the built-in tiny SD1-layout model (tests may train on it)."""
    return copy.deepcopy(_tiny_models["tiny"])


@pytest.fixture
def tiny_sdxl(_tiny_models) -> DiffusersBundle:
    return copy.deepcopy(_tiny_models["tiny-sdxl"])


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """The bundled sample images with their .txt captions, in a writable folder."""
    target = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, target)
    return target


def make_config(dataset_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    """Small, fast settings for the tiny models."""
    values = dict(
        train_data_dir=str(dataset_dir), output_dir=str(output_dir), output_name="test", resolution="64",
        min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, lora_rank=4, lora_alpha=4,
        learning_rate=1e-3, batch_size=2, max_train_steps=6, log_every_n_steps=1, save_precision="float",
    )
    values.update(overrides)
    return TrainConfig(**values)


def state_hashes(*modules: torch.nn.Module) -> dict[str, int]:
    """A fingerprint of every parameter and buffer (exact bits, not approximate values)."""
    result = {}
    for index, module in enumerate(modules):
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8) if tensor.numel() else tensor
            result[f"{index}.{name}"] = hash(bytes(data.numpy().tobytes()))
    return result
