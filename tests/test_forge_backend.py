"""Training on Forge 2 / Neo's own backend objects (stand-ins in tests/forge_backend_models.py; the real Forge 2
build is checked by ``tests/webui/run.sh --host forge``)."""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (requirements/ldm-test.txt)")
pytest.importorskip("pytorch_lightning", reason="needs pytorch_lightning<2 (requirements/ldm-test.txt)")

import forge_backend_models as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from lora_train.hosts.forge_backend import ForgeBackendBundle  # noqa: E402
from lora_train.webui.a1111 import WebUIHost  # noqa: E402
from lora_train.webui.forge_backend import ForgeBackendModel  # noqa: E402
from lora_train.webui.forge_weights import make_ordinary_in_place  # noqa: E402
from lora_train.webui.host_detect import detect_host  # noqa: E402
from lora_train.webui.jobs import HostError, JobRunner  # noqa: E402
from lora_train.webui.paths import PathPolicy  # noqa: E402

SMALL = dict(resolution="64", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, lora_rank=4,
             lora_alpha=4, learning_rate=1e-3, batch_size=2, log_every_n_steps=1, save_precision="float")


def _host(engine, manager, networks=None) -> WebUIHost:
    shared = SimpleNamespace(sd_model=engine, state=SimpleNamespace(interrupted=False), cmd_opts=SimpleNamespace())
    return WebUIHost(shared, threading.Lock(), lambda: networks, model_management=lambda: manager)


def _runner(host: WebUIHost, tmp_path: Path) -> JobRunner:
    return JobRunner(host, PathPolicy.for_webui(tmp_path, tmp_path / "Lora", tmp_path / "runs"))


def _weights(engine) -> dict[str, torch.Tensor]:
    """Every tensor of UNet, text encoder and VAE by name (inference tensors read inside inference mode)."""
    with torch.inference_mode():
        return {f"{i}.{k}": v.clone() for i, m in enumerate(engine.modules()) for k, v in m.state_dict().items()}


def _tensors(engine) -> list[torch.Tensor]:
    return [t for m in engine.modules() for t in [*m.parameters(), *m.buffers()]]


def test_forge2_model_is_detected_with_its_family() -> None:
    engine, manager = F.forge_load(F.StableDiffusion()), F.MemoryManagement()
    assert isinstance(detect_host(engine, lambda: manager), ForgeBackendModel)
    host = _host(engine, manager)
    assert host.family() == "sd1" and host.device_type() == "cpu"


def test_trains_right_after_a_lora_generation_and_leaves_forge_as_it_was(tmp_path, dataset_dir) -> None:
    engine, manager = F.forge_load(F.StableDiffusion()), F.MemoryManagement()
    networks = SimpleNamespace(loaded_networks=["someone"])
    plain = F.plain_generation(engine, manager)
    checkpoint = _weights(engine)
    F.lora_generation(engine, manager)
    unet = engine.forge_objects.unet.model.diffusion_model
    assert unet.out[2].weight.is_inference() and all(t.is_inference() for t in _tensors(engine))

    runner = _runner(_host(engine, manager, networks), tmp_path)
    job = runner.submit({**SMALL, "train_data_dir": str(dataset_dir), "output_name": "forge2", "max_train_steps": 3,
                         "train_text_encoder": True})
    assert job.done_event.wait(120)
    assert job.state == "done", (job.error, job.log[-10:])
    log = "\n".join(job.log)
    assert "undid the <lora:…> merge" in log and "inference tensors made ordinary tensors in place" in log
    assert "Forge transformer blocks add out of place" in log and "Forge Linear layers take LoRA" in log

    keys = {k.rsplit(".", 2)[0] for k in load_file(str(job.output))}
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in keys)  # SD1: diffusers block names
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    # Forge's state: the original patchers, loaded; nothing merged; the next <lora:…> applies again
    objects = engine.forge_objects
    assert objects.unet is engine.forge_objects_original.unet and networks.loaded_networks == []
    assert engine.current_lora_hash == str([]) and objects.unet.lora_loader.backup == {}
    assert [m.model for m in manager.current_loaded_models][:3] == [objects.vae.patcher, objects.clip.patcher,
                                                                   objects.unet]
    # the same values, now ordinary tensors, every Forge Linear its own class again
    assert not any(t.is_inference() for t in _tensors(engine))
    after = _weights(engine)
    assert after.keys() == checkpoint.keys() and all(torch.equal(after[k], checkpoint[k]) for k in checkpoint)
    linears = [m for m in engine.modules()[0].modules() if "Linear" in type(m).__name__]
    assert linears and all(type(m) is F.ForgeOperations.Linear for m in linears)
    assert torch.equal(F.plain_generation(engine, manager), plain)


def test_forges_lora_loader_patches_and_restores_the_ordinary_tensors() -> None:
    """Forge merges a ``<lora:…>`` under inference mode into new Parameters and puts its backup back later: the
    ordinary tensors training left serve both, and come back as the very same objects."""
    engine, manager = F.forge_load(F.StableDiffusion()), F.MemoryManagement()
    plain = F.plain_generation(engine, manager)
    make_ordinary_in_place(engine.modules())
    unet = engine.forge_objects.unet.model.diffusion_model
    ordinary = unet.out[2].weight
    F.lora_generation(engine, manager)
    assert unet.out[2].weight is not ordinary and unet.out[2].weight.is_inference()
    assert torch.equal(F.plain_generation(engine, manager), plain)
    assert unet.out[2].weight is ordinary and not ordinary.is_inference()


class _CloneWatch(TorchFunctionMode):
    """At each clone: how many of the watched inference tensors are still alive."""

    def __init__(self, watched: list[weakref.ref]):
        super().__init__()
        self.watched, self.alive_at_clone = watched, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.clone:
            self.alive_at_clone.append(sum(ref() is not None for ref in self.watched))
        return func(*args, **(kwargs or {}))


def test_in_place_conversion_holds_one_extra_tensor_at_most() -> None:
    """Each inference tensor is dropped before the next is cloned: the peak is one tensor more, not a model."""
    with torch.inference_mode():
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)])
    watched = [weakref.ref(p) for p in model.parameters()]
    with _CloneWatch(watched) as watch:
        replaced = make_ordinary_in_place([model])
    assert replaced == len(watched) == 12
    assert watch.alive_at_clone == list(range(12, 0, -1))  # every earlier original already freed
    assert all(ref() is None for ref in watched) and not any(p.is_inference() for p in model.parameters())


def test_a_weight_registered_twice_becomes_one_ordinary_tensor_in_both_places() -> None:
    engine = F.forge_load(F.StableDiffusion())
    embeddings = engine.forge_objects.clip.cond_stage_model["clip_l"].transformer.text_model.embeddings
    wrapper = embeddings.token_embedding
    assert wrapper.weight is wrapper.wrapped.weight and wrapper.weight.is_inference()
    make_ordinary_in_place(engine.modules())
    assert wrapper.weight is wrapper.wrapped.weight and not wrapper.weight.is_inference()


def test_bundle_conditioning_is_the_engines_own(tmp_path) -> None:
    """The trainer's text conditioning equals what the engine builds for generation (``get_learned_conditioning``),
    including a caption longer than one 75-token chunk (max_token_length 225: three chunks)."""
    engine = F.forge_load(F.StableDiffusion())
    bundle = ForgeBackendBundle(engine)
    captions = ["a photo of a cat", ", ".join(["a long caption"] * 40)]
    with torch.inference_mode():
        for caption in captions:
            ours = bundle.encode_text(bundle.tokenize([caption], max_chunks=3)).context
            assert torch.equal(ours, engine.text_processing_engine([caption]))
    assert bundle.tokenize(captions[1:], max_chunks=3).ids[0].shape[1] > 77
    assert bundle.tokenize(captions[1:]).ids[0].shape[1] == 77  # max_token_length 75: one chunk


def test_other_engines_are_refused_naming_the_families_that_work(tmp_path, dataset_dir) -> None:
    engine, manager = F.forge_load(F.Flux()), F.MemoryManagement()
    runner = _runner(_host(engine, manager), tmp_path)
    with pytest.raises(HostError, match="Flux .*works on SD1.5 and SDXL checkpoints"):
        runner.submit({**SMALL, "train_data_dir": str(dataset_dir), "max_train_steps": 1})
    assert runner.jobs == {}


def test_quantised_unet_is_refused_naming_the_option(tmp_path, dataset_dir) -> None:
    engine, manager = F.forge_load(F.StableDiffusion()), F.MemoryManagement()
    engine.forge_objects.unet.model.storage_dtype = "nf4"
    runner = _runner(_host(engine, manager), tmp_path)
    with pytest.raises(HostError, match='UNet quantised \\(nf4\\).*"Diffusion in Low Bits"'):
        runner.submit({**SMALL, "train_data_dir": str(dataset_dir), "max_train_steps": 1})


def test_a_model_streamed_from_cpu_memory_is_refused_naming_gpu_weights(tmp_path, dataset_dir) -> None:
    engine, manager = F.forge_load(F.StableDiffusion()), F.MemoryManagement()
    F.plain_generation(engine, manager)
    manager.current_loaded_models[0].model_accelerated = True  # the UNet, partly in CPU memory
    runner = _runner(_host(engine, manager), tmp_path)
    with pytest.raises(HostError, match='"GPU Weights \\(MB\\)"'):
        runner.submit({**SMALL, "train_data_dir": str(dataset_dir), "max_train_steps": 1})


def test_without_ordinary_tensors_forges_weights_cannot_train(tmp_path, dataset_dir, monkeypatch) -> None:
    """Why the conversion exists: Forge's inference tensors fail the first backward."""
    monkeypatch.setattr("lora_train.webui.forge_backend.make_ordinary_in_place", lambda modules: 0)
    engine, manager = F.forge_load(F.StableDiffusion()), F.MemoryManagement()
    job = _runner(_host(engine, manager), tmp_path).submit({**SMALL, "train_data_dir": str(dataset_dir),
                                                              "max_train_steps": 1})
    assert job.done_event.wait(120)
    assert job.state == "failed" and "Inference tensors" in (job.error or ""), job.error


def test_trains_before_any_generation(tmp_path, dataset_dir) -> None:
    """Forge loads lazily and its first text encoding changes the CLIP embeddings' dtype: training first must not
    be what changes them (the host check would fail), and the next generation sees the same weights."""
    engine, manager = F.forge_load(F.StableDiffusion()), F.MemoryManagement()
    job = _runner(_host(engine, manager), tmp_path).submit({**SMALL, "train_data_dir": str(dataset_dir),
                                                              "max_train_steps": 1})
    assert job.done_event.wait(120)
    assert job.state == "done", (job.error, job.log[-10:])
    fresh = F.forge_load(F.StableDiffusion())
    assert torch.equal(F.plain_generation(engine, manager), F.plain_generation(fresh, F.MemoryManagement()))


def test_sdxl_conditioning_is_the_engines_own() -> None:
    """SDXL: CLIP-L and G contexts side by side and the vector (pooled G, then the six size embeddings) as
    ``get_learned_conditioning`` builds them for a 1024² generation."""
    engine = F.forge_load(F.StableDiffusionXL())
    bundle = ForgeBackendBundle(engine)
    with torch.inference_mode():
        expected = engine.get_learned_conditioning(["a photo of a cat"])
        cond = bundle.encode_text(bundle.tokenize(["a photo of a cat"]))
        cond.size_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]])
        assert torch.equal(cond.context, expected["crossattn"])
        assert torch.equal(bundle.vector(cond, torch.zeros(1, 4, 128, 128)), expected["vector"])


def test_sdxl_token_ids_are_what_each_engine_feeds_its_encoder() -> None:
    """CLIP-G reads its pad token ("!", id 0) after the end token: Forge's process_tokens pads so. The ids the bundle
    gives (what the trainer caches, what the acceptance probe compares with Forge's own) are those; the real Forge 2
    SDXL run found the end token repeated there instead."""
    engine = F.forge_load(F.StableDiffusionXL())
    bundle = ForgeBackendBundle(engine)
    caption = "a photo of a cat"
    ids = bundle.tokenize([caption]).ids
    for text_engine, row in zip((engine.text_processing_engine_l, engine.text_processing_engine_g), ids, strict=True):
        text = text_engine.tokenizer(caption, add_special_tokens=False)["input_ids"]
        end, pad = text_engine.tokenizer.eos_token_id, text_engine.tokenizer.pad_token_id
        expected = [text_engine.tokenizer.bos_token_id, *text, end] + [pad] * (75 - len(text))
        assert row[0].tolist() == expected
    assert ids[1][0].tolist()[-1] == 0  # OpenCLIP's "!"


def test_sdxl_trains_unet_and_both_text_encoders_under_forges_key_names(tmp_path, dataset_dir) -> None:
    engine, manager = F.forge_load(F.StableDiffusionXL()), F.MemoryManagement()
    host = _host(engine, manager)
    assert host.family() == "sdxl"
    job = _runner(host, tmp_path).submit({**SMALL, "train_data_dir": str(dataset_dir), "output_name": "forge2-xl",
                                          "max_train_steps": 2, "train_text_encoder": True})
    assert job.done_event.wait(120)
    assert job.state == "done", (job.error, job.log[-10:])
    keys = {k.rsplit(".", 2)[0] for k in load_file(str(job.output))}
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # SDXL: the original block names
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    assert not any(t.is_inference() for t in _tensors(engine))


def test_in_place_lora_patching_under_inference_mode_keeps_them_ordinary(tmp_path, dataset_dir) -> None:
    """Neo's ComfyUI patcher (``weight_inplace_update``) merges into the weight itself under inference mode, from a
    backup copied there, and copies the backup back: the ordinary tensors take both and still train afterwards."""
    engine, manager = F.forge_load(F.StableDiffusion()), F.MemoryManagement()
    plain = F.plain_generation(engine, manager)
    make_ordinary_in_place(engine.modules())
    weight = engine.forge_objects.unet.model.diffusion_model.out[2].weight
    with torch.inference_mode():
        backup = weight.to("cpu", copy=True)
        weight.copy_(weight + 0.5)
    assert not torch.equal(F.plain_generation(engine, manager), plain)
    with torch.inference_mode():
        weight.copy_(backup)
    assert not weight.is_inference() and torch.equal(F.plain_generation(engine, manager), plain)
    job = _runner(_host(engine, manager), tmp_path).submit({**SMALL, "train_data_dir": str(dataset_dir),
                                                              "max_train_steps": 1})
    assert job.done_event.wait(120)
    assert job.state == "done", (job.error, job.log[-10:])



def test_converting_cpu_weights_gives_freed_heap_back_every_few_hundred_mb(monkeypatch) -> None:
    """The real Forge 2 SDXL on CPU grew by 4.8 GB while its weights were cloned one at a time (glibc kept the freed
    originals' heap pages until the end; with trims every 256 MiB the growth was 0.7 GB). A small model cannot show
    the fragmentation, so this checks when the heap is trimmed: after each ``TRIM_EVERY_BYTES`` cloned, not before."""
    import lora_train.webui.forge_weights as W

    trims: list[int] = []
    monkeypatch.setattr(W, "TRIM_EVERY_BYTES", 3 * 64 * 64 * 4)  # three 64x64 fp32 weights
    monkeypatch.setattr(W, "_malloc_trim", lambda: trims.append)
    with torch.inference_mode():
        model = nn.ParameterList([nn.Parameter(torch.ones(64, 64)) for _ in range(7)])
    assert make_ordinary_in_place([model]) == 7
    assert trims == [0, 0] and not any(p.is_inference() for p in model)  # after the 3rd and the 6th
