"""Training behaviour on the tiny models: it learns, touches nothing but LoRA, resumes exactly, stops safely."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, state_hashes

from lora_train import lora, trainer
from lora_train.export import read_lora
from lora_train.trainer import TrainCallbacks, train


def test_loss_falls_and_host_weights_are_untouched(tiny, dataset_dir, tmp_path):
    before = state_hashes(tiny.unet, tiny.vae, *tiny.text_encoders)
    grads_before = [p.requires_grad for p in tiny.unet.parameters()]
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=40, batch_size=2,
                      log_every_n_steps=5)
    result = train(cfg, tiny)
    first, last = result.loss_history[0], sum(result.loss_history[-3:]) / 3
    assert last < 0.9 * first, result.loss_history
    assert result.output is not None and result.output.is_file()
    assert state_hashes(tiny.unet, tiny.vae, *tiny.text_encoders) == before
    assert [p.requires_grad for p in tiny.unet.parameters()] == grads_before
    assert not any("lora" in name for name, _ in tiny.unet.named_modules())


def test_only_lora_parameters_get_gradients(tiny, dataset_dir, tmp_path):
    cfg = make_config(dataset_dir, tmp_path, train_text_encoder=True)
    run = trainer.Trainer(cfg, tiny)
    for module in (tiny.unet, *tiny.text_encoders):
        module.requires_grad_(False)
    network = lora.inject(tiny.lora_targets(True), 4, 4, 0.0)
    try:
        lora.trainable(network.parameters(), True)
        for layer in network.layers.values():  # non-zero up so gradients reach every down
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
        run._loss([0, 1], seed=0).backward()
        lora_params = {id(p) for p in network.parameters()}
        for module in (tiny.unet, *tiny.text_encoders):
            for name, param in module.named_parameters():
                if id(param) in lora_params:
                    assert param.grad is not None and param.grad.abs().sum() > 0, name
                else:
                    assert param.grad is None, name
    finally:
        lora.remove(network)


def test_resume_ends_where_an_uninterrupted_run_ends(tiny, dataset_dir, tmp_path):
    straight = train(make_config(dataset_dir, tmp_path / "a", max_train_steps=8, batch_size=2), tiny)

    class StopAfter4(TrainCallbacks):
        def on_step(self, info):
            self.step = info.step

        def should_stop(self):
            return getattr(self, "step", 0) >= 4

    first = train(make_config(dataset_dir, tmp_path / "b", max_train_steps=8, batch_size=2), tiny, StopAfter4())
    assert first.stopped and first.steps == 4
    state = tmp_path / "b" / "test-state"
    resumed = train(make_config(dataset_dir, tmp_path / "b", max_train_steps=8, batch_size=2, resume=str(state)),
                    tiny)
    assert resumed.steps == 8 and resumed.output == first.output
    a, _ = read_lora(straight.output)
    b, meta = read_lora(resumed.output)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert meta["ss_steps"] == "8"


def test_stop_leaves_a_usable_checkpoint_and_restores_host(tiny, dataset_dir, tmp_path):
    before = state_hashes(tiny.unet, *tiny.text_encoders)

    class StopAt2(TrainCallbacks):
        steps = 0

        def on_step(self, info):
            self.steps = info.step

        def should_stop(self):
            return self.steps >= 2

    result = train(make_config(dataset_dir, tmp_path, max_train_steps=50), tiny, StopAt2())
    assert result.stopped and result.steps == 2
    tensors, meta = read_lora(result.output)
    assert meta["ss_steps"] == "2" and len(tensors) == 72 * 3
    assert state_hashes(tiny.unet, *tiny.text_encoders) == before


def test_exception_mid_run_restores_host(tiny, dataset_dir, tmp_path):
    before = state_hashes(tiny.unet, *tiny.text_encoders)

    class Boom(TrainCallbacks):
        def on_step(self, info):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(make_config(dataset_dir, tmp_path), tiny, Boom())
    assert state_hashes(tiny.unet, *tiny.text_encoders) == before
    assert not any("lora" in name for name, _ in tiny.unet.named_modules())


def test_existing_output_is_never_overwritten(tiny, dataset_dir, tmp_path):
    first = train(make_config(dataset_dir, tmp_path, max_train_steps=1), tiny)
    original = first.output.read_bytes()
    second = train(make_config(dataset_dir, tmp_path, max_train_steps=1), tiny)
    assert second.output.name == "test-2.safetensors"
    assert first.output.read_bytes() == original
    third = train(make_config(dataset_dir, tmp_path, max_train_steps=1, overwrite=True), tiny)
    assert third.output == first.output


def test_periodic_checkpoints_and_samples(tiny, dataset_dir, tmp_path):
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=4, save_every_n_steps=2, sample_every_n_steps=4,
                      sample_prompts=["a red circle"], sample_steps=2)
    result = train(cfg, tiny)
    assert (tmp_path / "test-step00000002.safetensors").is_file()
    assert (tmp_path / "test-state" / "state.json").is_file()
    assert len(result.samples) == 1 and result.samples[0].is_file()


def test_network_weights_continue_from_a_file(tiny, dataset_dir, tmp_path):
    base = train(make_config(dataset_dir, tmp_path / "a", max_train_steps=3, lora_rank=8, lora_alpha=2), tiny)
    cfg = make_config(dataset_dir, tmp_path / "b", max_train_steps=1, learning_rate=1e-12, optimizer="sgd",
                      network_weights=str(base.output))
    continued = train(cfg, tiny)
    a, _ = read_lora(base.output)
    b, meta = read_lora(continued.output)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "2.0"
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_loss_target_matches_parameterization(parameterization):
    alphas = torch.linspace(0.99, 0.01, 1000)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    target = trainer.loss_target(parameterization, latents, noise, t, alphas)
    if parameterization == "eps":
        assert torch.equal(target, noise)
    else:
        a = alphas[t].view(-1, 1, 1, 1)
        assert torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * latents)


def test_min_snr_weights_cap_easy_timesteps():
    alphas = torch.linspace(0.999, 0.001, 1000)
    weights = trainer.min_snr_weights(torch.tensor([0, 999]), alphas, 5.0, "eps")
    assert weights[0] < 0.01 and weights[1] == pytest.approx(1.0)


def test_sdxl_layout_trains_with_accumulation_and_options(tiny_sdxl, dataset_dir, tmp_path):
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=3, gradient_accumulation_steps=2, min_snr_gamma=5,
                      noise_offset=0.05, shuffle_caption=True, keep_tokens=1, lr_scheduler="cosine",
                      lr_warmup_steps=1, gradient_checkpointing=True, v_parameterization=True,
                      train_text_encoder=True)
    result = train(cfg, tiny_sdxl)
    tensors, meta = read_lora(result.output)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_adamw8bit_runs_when_bitsandbytes_is_there(tiny, dataset_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = train(make_config(dataset_dir, tmp_path, max_train_steps=2, optimizer="adamw8bit"), tiny)
    assert result.steps == 2


def test_disk_latent_cache_is_reused_by_the_next_run(tiny, dataset_dir, tmp_path):
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=1, cache_latents_to_disk=True)
    first = train(cfg, tiny)
    cached = sorted((tmp_path / ".latent_cache").glob("*.safetensors"))
    assert len(cached) == 6
    calls = []
    original = tiny.encode_images
    tiny.encode_images = lambda pixels: calls.append(1) or original(pixels)
    second = train(make_config(dataset_dir, tmp_path, max_train_steps=1, cache_latents_to_disk=True), tiny)
    assert calls == []  # every latent came from disk
    a, _ = read_lora(first.output)
    b, _ = read_lora(second.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    (dataset_dir / "00_red_circle.png").touch()  # a changed image is encoded again
    train(make_config(dataset_dir, tmp_path, max_train_steps=1, cache_latents_to_disk=True, overwrite=True), tiny)
    assert len(calls) == 1


def test_tensorboard_prompts_file_and_fast_path_switches(tiny, dataset_dir, tmp_path):
    before = state_hashes(tiny.unet)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# previews\na red circle\n\na blue square\n")
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=2, logging_dir=str(tmp_path / "logs"),
                      sample_prompts=[str(prompts)], sample_every_n_steps=2, sample_steps=2, channels_last=True)
    result = train(cfg, tiny)
    assert len(result.samples) == 2
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))
    assert state_hashes(tiny.unet) == before
    assert all(p.is_contiguous() for p in tiny.unet.parameters())


@pytest.mark.slow
def test_torch_compile_trains_and_restores_forward(tiny, dataset_dir, tmp_path):
    result = train(make_config(dataset_dir, tmp_path, max_train_steps=2, torch_compile=True), tiny)
    assert result.steps == 2
    assert "forward" not in vars(tiny.unet)


def test_uncached_images_stream_through_the_loader_with_the_same_result(tiny, dataset_dir, tmp_path):
    cached = train(make_config(dataset_dir, tmp_path / "a", max_train_steps=5), tiny)
    streamed = train(make_config(dataset_dir, tmp_path / "b", max_train_steps=5, cache_latents=False), tiny)
    a, _ = read_lora(cached.output)
    b, _ = read_lora(streamed.output)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
