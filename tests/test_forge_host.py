"""The WebUI adapter on Forge-family models in A1111's shape (reForge, Forge Classic), and the refusal of a Forge
model it cannot place (Forge 2 / Neo's backend engine: tests/test_forge_backend.py).

No Forge here: the stand-ins follow the shapes the real hosts have (tests/forge/NOTES.md). A tiny real LDM model
whose UNet is an ``ldm_patched`` class with Forge Classic's in-place transformer blocks, ``forge_objects`` /
``forge_objects_original`` holding ModelPatchers (``patches``, ``backup``, ``patch_model`` replacing weights by
new Parameters, ``unpatch_model``), and a ``model_management.load_models_gpu`` that unloads clones of a patcher
before loading it, as Forge's does. A ``<lora:…>`` generation is simulated the way Forge runs one: a patched
clone loaded under ``torch.inference_mode()``, left loaded afterwards.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (requirements/ldm-test.txt)")
pytest.importorskip("pytorch_lightning", reason="needs pytorch_lightning<2 (requirements/ldm-test.txt)")

import ldm_models as M  # noqa: E402
from ldm.modules.attention import BasicTransformerBlock as LdmBlock  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel as LdmUNet  # noqa: E402

from lora_train.webui.a1111 import WebUIHost  # noqa: E402
from lora_train.webui.forge import ForgeModel  # noqa: E402
from lora_train.webui.host_detect import A1111Model, detect_host  # noqa: E402
from lora_train.webui.host_snapshot import HostSnapshot  # noqa: E402
from lora_train.webui.jobs import HostError, JobRunner  # noqa: E402
from lora_train.webui.paths import PathPolicy  # noqa: E402

SMALL = dict(resolution="64", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, lora_rank=4,
             lora_alpha=4, learning_rate=1e-3, batch_size=2, log_every_n_steps=1, save_precision="float")
PATCHED_KEY = "diffusion_model.out.2.weight"


class BasicTransformerBlock(LdmBlock):
    """Forge Classic's block (ldm_patched/ldm/modules/attention.py): the residuals are added in place."""

    def _forward(self, x, context=None):
        n = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        x += n
        n = self.attn2(self.norm2(x), context=context)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


class UNetModel(LdmUNet):
    """Forge's copy of ldm's UNet, under its ldm_patched module path."""


BasicTransformerBlock.__module__ = "ldm_patched.ldm.modules.attention"
UNetModel.__module__ = "ldm_patched.ldm.modules.diffusionmodules.openaimodel"


class ModelPatcher:
    """ldm_patched.modules.model_patcher.ModelPatcher: weight patches applied at load, originals kept in ``backup``."""

    def __init__(self, model: torch.nn.Module, patches: dict | None = None):
        self.model, self.patches, self.backup = model, dict(patches or {}), {}

    def clone(self, patches: dict) -> ModelPatcher:
        return ModelPatcher(self.model, {**self.patches, **patches})

    def patch_model(self) -> None:
        for key, delta in self.patches.items():
            module_name, _, attr = key.rpartition(".")
            module = self.model.get_submodule(module_name)
            self.backup.setdefault(key, getattr(module, attr))
            setattr(module, attr, torch.nn.Parameter(self.backup[key] + delta))  # a new Parameter, as set_attr_param

    def unpatch_model(self) -> None:
        for key, original in self.backup.items():
            module_name, _, attr = key.rpartition(".")
            setattr(self.model.get_submodule(module_name), attr, original)
        self.backup = {}


class ModelManagement:
    """ldm_patched.modules.model_management: loading a patcher first unloads (unpatches) its loaded clones."""

    def __init__(self) -> None:
        self.current_loaded_models: list[ModelPatcher] = []

    def load_models_gpu(self, patchers: list[ModelPatcher]) -> None:
        for patcher in patchers:
            for loaded in list(self.current_loaded_models):
                if loaded is not patcher and loaded.model is patcher.model:
                    loaded.unpatch_model()
                    self.current_loaded_models.remove(loaded)
            if patcher not in self.current_loaded_models:
                patcher.patch_model()
                self.current_loaded_models.append(patcher)


class ForgeObjects(SimpleNamespace):
    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(**vars(self))


def forge_model() -> torch.nn.Module:
    """A tiny SD1 model as reForge / Forge Classic hold it (weights trainable, as Forge loads them)."""
    model = M.tiny_sd1()
    model.model.diffusion_model.__class__ = UNetModel
    for module in model.modules():
        if type(module) is LdmBlock:
            module.__class__ = BasicTransformerBlock
    model.requires_grad_(True)
    clip = SimpleNamespace(patcher=ModelPatcher(model.cond_stage_model))
    vae = SimpleNamespace(patcher=ModelPatcher(model.first_stage_model))
    model.forge_objects = ForgeObjects(unet=ModelPatcher(model.model), clip=clip, vae=vae)
    model.forge_objects_original = model.forge_objects.shallow_copy()
    model.forge_objects_after_applying_lora = model.forge_objects.shallow_copy()
    model.current_lora_hash = str([])
    return model


class UnknownForge:
    """A model with Forge's ``forge_objects`` but neither an ldm_patched UNet nor Forge 2's backend engine."""

    def __init__(self) -> None:
        self.forge_objects = ForgeObjects(unet=None, clip=None, vae=None, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.cond_stage_model = None


UnknownForge.__module__ = "some_fork.engine"


def lora_generation(model: torch.nn.Module, manager: ModelManagement) -> None:
    """What ``<lora:…>`` leaves behind in Forge: a patched clone loaded, its weights inference tensors."""
    delta = torch.full_like(model.model.diffusion_model.out[2].weight, 0.5)
    model.forge_objects.unet = model.forge_objects_original.unet.clone({PATCHED_KEY: delta})
    model.current_lora_hash = "[['/models/Lora/someone.safetensors', 1.0, 1.0]]"
    model.forge_objects_after_applying_lora = model.forge_objects.shallow_copy()
    with torch.inference_mode():
        manager.load_models_gpu([model.forge_objects.unet])


def plain_output(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=context)


def _host(model, manager=None, networks=None) -> WebUIHost:
    shared = SimpleNamespace(sd_model=model, state=SimpleNamespace(interrupted=False), cmd_opts=SimpleNamespace())
    return WebUIHost(shared, threading.Lock(), lambda: networks, model_management=lambda: manager)


def _runner(host: WebUIHost, tmp_path: Path) -> JobRunner:
    return JobRunner(host, PathPolicy.for_webui(tmp_path, tmp_path / "Lora", tmp_path / "runs"))


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]


def test_detects_each_host_by_its_model_object() -> None:
    a1111 = M.tiny_sd1()
    assert isinstance(detect_host(a1111), A1111Model)
    assert detect_host(forge_model()).name.startswith("Forge")
    with pytest.raises(HostError) as refused:
        detect_host(UnknownForge())
    assert "some_fork.engine.UnknownForge" in str(refused.value)
    assert "AUTOMATIC1111 1.10, reForge, Forge Classic and Forge 2 / Neo" in str(refused.value)


def test_an_unknown_forge_model_is_refused_at_submit_naming_the_hosts_that_work(tmp_path, dataset_dir) -> None:
    host = _host(UnknownForge())
    assert host.family() is None
    runner = _runner(host, tmp_path)
    with pytest.raises(HostError, match="reForge, Forge Classic and Forge 2 / Neo"):
        runner.submit({**SMALL, "train_data_dir": str(dataset_dir), "max_train_steps": 1})
    assert runner.jobs == {}


def test_job_right_after_a_lora_generation_trains_and_leaves_forge_as_it_was(tmp_path, dataset_dir) -> None:
    model, manager = forge_model(), ModelManagement()
    networks = SimpleNamespace(loaded_networks=["someone"])
    manager.load_models_gpu([model.forge_objects.unet])  # a plain generation first
    plain = plain_output(model)
    snapshot = HostSnapshot.take(model)
    lora_generation(model, manager)
    assert model.model.diffusion_model.out[2].weight.is_inference()
    assert not torch.equal(plain_output(model), plain)

    runner = _runner(_host(model, manager, networks), tmp_path)
    job = runner.submit({**SMALL, "train_data_dir": str(dataset_dir), "output_name": "forge", "max_train_steps": 3})
    assert job.done_event.wait(120)
    assert job.state == "done", (job.error, job.log[-10:])
    assert any("undid the <lora:…> merge" in line for line in job.log)
    assert any("Forge transformer blocks add out of place" in line for line in job.log)
    assert job.output is not None and job.output.is_file()

    snapshot.verify()  # the checkpoint's own weights, flags and modules, untouched by training
    assert all("_forward" not in vars(block) for block in _blocks(model))
    assert model.forge_objects.unet is model.forge_objects_original.unet and networks.loaded_networks == []
    assert manager.current_loaded_models == [model.forge_objects.unet, model.forge_objects.clip.patcher,
                                             model.forge_objects.vae.patcher]  # what training runs, loaded
    assert model.current_lora_hash == str([])  # the next <lora:…> generation applies its LoRA again
    assert model.forge_objects_after_applying_lora.unet is model.forge_objects_original.unet
    assert torch.equal(plain_output(model), plain)


def script_clone_generation(model: torch.nn.Module, manager: ModelManagement) -> None:
    """A plain generation with an always-on script (FreeU, RescaleCFG, ...): the UNet's patcher is a clone with
    model options but no weight patches, and it stays in ``forge_objects`` afterwards."""
    model.forge_objects.unet = model.forge_objects_original.unet.clone({})
    with torch.inference_mode():
        manager.load_models_gpu([model.forge_objects.unet])


def a1111_after_a_lora_then_a_plain_generation() -> torch.nn.Module:
    """What A1111's Lora extension leaves after ``<lora:…>`` then a plain prompt: backups kept, weights restored."""
    model = M.tiny_sd1()
    for module in model.model.diffusion_model.modules():
        if isinstance(module, torch.nn.Linear):
            module.network_weights_backup = module.weight.to("cpu", copy=True)
            module.network_bias_backup = None if module.bias is None else module.bias.to("cpu", copy=True)
            module.network_current_names = ()
    return model


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_the_log_says_a_merge_was_undone_only_when_one_was(tmp_path, dataset_dir, host) -> None:
    if host == "forge":
        model, manager = forge_model(), ModelManagement()
        script_clone_generation(model, manager)
    else:
        model, manager = a1111_after_a_lora_then_a_plain_generation(), None
    runner = _runner(_host(model, manager, SimpleNamespace(loaded_networks=[])), tmp_path)
    job = runner.submit({**SMALL, "train_data_dir": str(dataset_dir), "max_train_steps": 1})
    assert job.done_event.wait(120) and job.state == "done", (job.error, job.log[-10:])
    assert not [line for line in job.log if "undid" in line]


def test_without_the_out_of_place_patch_forge_classic_blocks_fail_to_train(tmp_path, dataset_dir, monkeypatch) -> None:
    monkeypatch.setattr(ForgeModel, "run_scope", lambda self, model, log: nullcontext())  # training as before #15
    runner = _runner(_host(forge_model(), ModelManagement()), tmp_path)
    job = runner.submit({**SMALL, "train_data_dir": str(dataset_dir), "max_train_steps": 1})
    assert job.done_event.wait(120)
    assert job.state == "failed" and "modified by an inplace operation" in (job.error or "")


def test_blocks_get_forges_method_back_after_a_crash(tmp_path, dataset_dir) -> None:
    from lora_train.engine.config.settings import TrainConfig
    from lora_train.webui.jobs import Job

    model = forge_model()
    host = _host(model, ModelManagement())
    cfg = TrainConfig(train_data_dir=str(dataset_dir), **SMALL)
    job = Job(id="crash", cfg=cfg)
    with pytest.raises(RuntimeError, match="out of memory"):
        with host.session(cfg, job):
            assert all("_forward" in vars(block) for block in _blocks(model))
            raise RuntimeError("CUDA out of memory")
    assert _blocks(model) and all("_forward" not in vars(block) for block in _blocks(model))
    assert host.queue_lock.acquire(blocking=False)


def test_forge_without_its_model_manager_refuses_a_merged_model_clearly() -> None:
    model = forge_model()
    lora_generation(model, ModelManagement())
    with pytest.raises(HostError, match="model manager"):
        detect_host(model, lambda: None).undo_prompt_lora(model, None, print)


def test_the_grid_check_passes_forges_rewrapped_weights_and_catches_a_changed_byte() -> None:
    """Forge's unpatch (ldm_patched utils.set_attr / set_attr_param) puts each LoRA-patched weight back as
    ``Parameter(original, requires_grad=False)``: same bytes, same storage, a flag that Forge loaded as True."""
    model = forge_model()
    snapshot = HostSnapshot.take(model, full=True)
    out = model.model.diffusion_model.out[2]
    out.weight = torch.nn.Parameter(out.weight.data, requires_grad=False)
    snapshot.verify(requires_grad=False)
    with pytest.raises(RuntimeError, match="requires_grad"):
        snapshot.verify()
    with torch.no_grad():
        out.weight[0, 0, 0, 0] += 1
    with pytest.raises(RuntimeError, match="tensor"):
        snapshot.verify(requires_grad=False)
