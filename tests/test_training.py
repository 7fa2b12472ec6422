"""Training behaviour on the tiny models: it learns, touches nothing but LoRA, resumes exactly, stops safely."""

from __future__ import annotations

import math
import shutil
import sys
import types

import pytest
import torch
from conftest import make_config, state_hashes

from lora_train.engine import preflight
from lora_train.engine.data import dataset
from lora_train.engine.network import lora
from lora_train.engine.output.export import read_lora
from lora_train.engine.train import loss, progress, run_state, trainer
from lora_train.engine.train.progress import NonFiniteError, TrainCallbacks
from lora_train.engine.train.trainer import train


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


def test_previews_see_the_lora_in_eval_mode_and_training_resumes_in_train_mode(tiny, dataset_dir, tmp_path):
    seen = []

    def sample_fn(bundle, prompts, step):
        layers = [m for m in bundle.unet.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
        seen.append((step, any(m.training for m in bundle.unet.modules()), len(layers)))
        return []

    cfg = make_config(dataset_dir, tmp_path, max_train_steps=4, lora_dropout=0.5, sample_every_n_steps=2,
                      sample_prompts=["a red circle"], sample_steps=2)
    dropout_active = []

    class Watch(TrainCallbacks):
        def on_step(self, info):
            dropout_active.append(any(m.training for m in tiny.unet.modules() if type(m).__name__ == "Dropout"))

    train(cfg, tiny, Watch(), sample_fn)
    assert [(step, training) for step, training, _ in seen] == [(2, False), (4, False)]
    assert all(count > 0 for _, _, count in seen)  # the LoRA was in place while sampling
    assert dropout_active == [True] * 4  # and dropout was back on for the steps after each preview


def test_network_weights_continue_from_a_file(tiny, dataset_dir, tmp_path):
    base = train(make_config(dataset_dir, tmp_path / "a", max_train_steps=3, lora_rank=8, lora_alpha=2), tiny)
    cfg = make_config(dataset_dir, tmp_path / "b", max_train_steps=1, learning_rate=1e-12, optimizer="sgd",
                      network_weights=str(base.output))
    continued = train(cfg, tiny)
    a, _ = read_lora(base.output)
    b, meta = read_lora(continued.output)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "2.0"
    assert (continued.facts.rank, continued.facts.alpha) == (8, 2.0)  # the job's description reads these
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.fixture
def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")


def test_noising_and_targets_match_diffusers(ddpm):
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    alphas = ddpm.alphas_cumprod
    torch.testing.assert_close(loss.add_noise(latents, noise, t, alphas), ddpm.add_noise(latents, noise, t))
    torch.testing.assert_close(loss.loss_target("v", latents, noise, t, alphas),
                               ddpm.get_velocity(latents, noise, t))
    assert torch.equal(loss.loss_target("eps", latents, noise, t, alphas), noise)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_min_snr_weights_match_diffusers_example(ddpm, parameterization):
    """diffusers' train_text_to_image: min(SNR, γ) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    try:
        from diffusers.training_utils import compute_snr
    except (ImportError, AttributeError):  # diffusers 0.31 with transformers 4.30: needs transformers' deepspeed
        pytest.skip("diffusers.training_utils does not import next to this transformers (runs in .venv-current)")

    t = torch.tensor([0, 10, 500, 999])
    snr = compute_snr(ddpm, t)
    capped = torch.minimum(snr, torch.full_like(snr, 5.0))
    expected = capped / (snr + 1) if parameterization == "v" else capped / snr
    torch.testing.assert_close(loss.min_snr_weights(t, ddpm.alphas_cumprod, 5.0, parameterization), expected)


@pytest.mark.parametrize(("parameterization", "last_weight"), [("eps", 1.0), ("v", 0.0)])
def test_min_snr_weights_stay_finite_on_a_zero_terminal_snr_schedule(parameterization, last_weight):
    """SNR is exactly 0 at the last timestep after rescaling (Lin et al. 2023): min(SNR, γ)/SNR there is
    0/0; the weight must be its limit (1 for epsilon: min(SNR, γ) = SNR near 0; 0 for v), never NaN."""
    from diffusers import DDPMScheduler

    zero_snr = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             rescale_betas_zero_snr=True)
    assert zero_snr.alphas_cumprod[-1] == 0
    t = torch.tensor([0, 500, 998, 999])
    weights = loss.min_snr_weights(t, zero_snr.alphas_cumprod, 5.0, parameterization)
    assert torch.isfinite(weights).all()
    assert weights[-1].item() == pytest.approx(last_weight, abs=1e-6)


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


def unet_weights(path):
    tensors, _ = read_lora(path)
    return {k: v for k, v in tensors.items() if k.startswith("lora_unet")}


def test_lora_dropout_is_active_without_gradient_checkpointing(tiny, dataset_dir, tmp_path):
    plain = train(make_config(dataset_dir, tmp_path / "a", max_train_steps=2, lora_dropout=0.0), tiny)
    dropped = train(make_config(dataset_dir, tmp_path / "b", max_train_steps=2, lora_dropout=0.5), tiny)
    a, b = unet_weights(plain.output), unet_weights(dropped.output)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_progress_every_step_and_loss_every_n_steps(tiny, dataset_dir, tmp_path):
    infos = []

    class Record(TrainCallbacks):
        def on_step(self, info):
            infos.append(info)

    result = train(make_config(dataset_dir, tmp_path, max_train_steps=4, log_every_n_steps=3), tiny, Record())
    assert [i.step for i in infos] == [1, 2, 3, 4]
    assert [i.loss is not None for i in infos] == [False, False, True, True]
    assert result.loss_history == [infos[2].loss, infos[3].loss]
    assert infos[0].it_per_s > 0 and infos[0].eta_s > 0 and infos[-1].eta_s == 0


def test_the_job_keeps_its_last_loss_on_steps_without_a_reading():
    from lora_train.engine.config.settings import TrainConfig
    from lora_train.webui.jobs import Job, _JobCallbacks

    class Host:
        def report(self, job):
            self.reported = job.step

    job, host = Job("j", TrainConfig()), Host()
    callbacks = _JobCallbacks(job, host)
    callbacks.on_step(progress.StepInfo(1, 4, 0, 0.25, 1e-4, 2.0, 1.5))
    callbacks.on_step(progress.StepInfo(2, 4, 0, None, 1e-4, 2.0, 1.0))
    assert (job.step, job.loss, job.losses, host.reported) == (2, 0.25, [(1, 0.25)], 2)


def test_stop_while_caching_latents_leaves_nothing_behind(tiny, dataset_dir, tmp_path):
    encoded = []
    original = tiny.encode_images
    tiny.encode_images = lambda pixels: encoded.append(1) or original(pixels)

    class StopAfterTwoImages(TrainCallbacks):
        def should_stop(self):
            return len(encoded) >= 2

    out = tmp_path / "out"
    result = train(make_config(dataset_dir, out, cache_latents_to_disk=True), tiny, StopAfterTwoImages())
    assert result.stopped and result.output is None and result.steps == 0
    assert len(encoded) == 2
    written = sorted(p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file())
    assert written == [".latent_cache", ".latent_cache"]  # two complete cache entries, nothing else


def test_metadata_and_facts_describe_the_run_that_happened(tiny, dataset_dir, tmp_path):
    cfg = make_config(dataset_dir, tmp_path, epochs=10, train_text_encoder=True, unet_lr=2e-3,
                      text_encoder_lr=5e-4)
    one_epoch = trainer.Trainer(cfg, tiny).batches_per_epoch
    cfg = make_config(dataset_dir, tmp_path, epochs=10, max_train_steps=one_epoch + 1, train_text_encoder=True,
                      unet_lr=2e-3, text_encoder_lr=5e-4)
    result = train(cfg, tiny)
    _, meta = read_lora(result.output)
    assert meta["ss_num_epochs"] == "2" and meta["ss_epoch"] == "2"  # max_train_steps ended it in epoch 2 of 10
    assert float(meta["ss_unet_lr"]) == 2e-3 and float(meta["ss_text_encoder_lr"]) == 5e-4
    assert (result.facts.unet_lr, result.facts.text_encoder_lr, result.facts.num_epochs) == (2e-3, 5e-4, 2)


class NanFromCall:
    """Wraps bundle.predict: training forwards from the ``n``-th on return NaN (an fp16 overflow, a bad lr)."""

    def __init__(self, bundle, n):
        self.predict, self.n, self.calls = bundle.predict, n, 0

    def __call__(self, noisy, timesteps, cond):
        out = self.predict(noisy, timesteps, cond)
        self.calls += torch.is_grad_enabled()
        return out * float("nan") if self.calls >= self.n else out


@pytest.mark.parametrize("log_every", [1, 10])
def test_nan_stops_with_a_cause_and_keeps_the_last_good_checkpoint(tiny, dataset_dir, tmp_path, log_every):
    tiny.predict = NanFromCall(tiny, 3)
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=6, save_every_n_steps=2, log_every_n_steps=log_every)
    with pytest.raises(NonFiniteError, match="learning rate") as error:
        train(cfg, tiny)
    assert "test-state" in str(error.value)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["test-step00000002.safetensors"]
    assert run_state.read(tmp_path / "test-state").step == 2  # the state left is step 2's, all finite
    tensors, _ = read_lora(tmp_path / "test-step00000002.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_a_nan_latent_names_the_image_and_is_not_cached(tiny, dataset_dir, tmp_path):
    original = tiny.encode_images
    calls = []

    def third_is_broken(pixels):
        calls.append(1)
        latents = original(pixels)
        return latents * float("nan") if len(calls) == 3 else latents

    tiny.encode_images = third_is_broken
    cfg = make_config(dataset_dir, tmp_path, cache_latents_to_disk=True)
    broken = trainer.Trainer(cfg, tiny).dataset.items[2].path
    with pytest.raises(NonFiniteError, match=broken.name):
        train(cfg, tiny)
    assert len(list((tmp_path / ".latent_cache").glob("*.safetensors"))) == 2


def test_prodigy_with_an_adam_sized_learning_rate_warns(tiny, dataset_dir, tmp_path, monkeypatch):
    fake = types.ModuleType("prodigyopt")
    fake.Prodigy = lambda groups, lr, **kwargs: torch.optim.SGD(groups, lr=lr)
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    logs = []

    class Record(TrainCallbacks):
        def on_log(self, message):
            logs.append(message)

    train(make_config(dataset_dir, tmp_path, max_train_steps=1, optimizer="prodigy", learning_rate=1e-4), tiny,
          Record())
    assert any("prodigy" in m and "1.0" in m for m in logs), logs


def test_bf16_mixed_precision_trains(tiny, dataset_dir, tmp_path):
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=24, log_every_n_steps=4, learning_rate=5e-3,
                      mixed_precision="bf16")
    result = train(cfg, tiny)
    assert all(math.isfinite(v) for v in result.loss_history)
    assert sum(result.loss_history[-2:]) / 2 < 0.9 * result.loss_history[0], result.loss_history


def test_prior_loss_weight_scales_the_regularization_images(tiny, dataset_dir, tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    for name in ("00_red_circle.png", "04_purple_square.png"):  # no captions: regularization images need none
        shutil.copy(dataset_dir / name, reg / name)
    losses = {}
    for weight in (0.0, 0.5, 1.0):
        run = trainer.Trainer(make_config(dataset_dir, tmp_path, reg_data_dir=str(reg), prior_loss_weight=weight),
                              tiny)
        train_index = next(i for i, item in enumerate(run.dataset.items) if not item.is_reg)
        reg_index = next(i for i, item in enumerate(run.dataset.items) if item.is_reg)
        with torch.no_grad():
            losses[weight] = float(run._loss([train_index, reg_index], seed=7))
    assert losses[1.0] > losses[0.0] > 0
    assert losses[0.5] == pytest.approx((losses[0.0] + losses[1.0]) / 2, rel=1e-5)
    result = train(make_config(dataset_dir, tmp_path, max_train_steps=1, reg_data_dir=str(reg),
                               prior_loss_weight=0.5), tiny)
    _, meta = read_lora(result.output)
    assert meta["ss_num_reg_images"] == "2" and meta["ss_prior_loss_weight"] == "0.5"


def test_max_grad_norm_zero_turns_clipping_off(tiny, dataset_dir, tmp_path):
    def one_step(norm):
        cfg = make_config(dataset_dir, tmp_path / str(norm), max_train_steps=1, optimizer="sgd", learning_rate=0.5,
                          max_grad_norm=norm)
        return unet_weights(train(cfg, tiny).output)

    off, huge, tight = one_step(0), one_step(1e9), one_step(1e-6)
    assert all(torch.equal(off[k], huge[k]) for k in off)
    assert any(not torch.equal(off[k], tight[k]) for k in off)


def test_a_dataset_scanned_by_preflight_is_not_scanned_again(tiny, dataset_dir, tmp_path, monkeypatch):
    cfg = make_config(dataset_dir, tmp_path, max_train_steps=1)
    scanned = preflight.check(cfg, None)  # what the CLI does before loading the model
    monkeypatch.setattr(dataset, "scan", lambda cfg: pytest.fail("the dataset was scanned a second time"))
    result = train(cfg, tiny, dataset=scanned)
    assert result.steps == 1 and result.output.is_file()
