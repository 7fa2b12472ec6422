"""kohya's noise and loss options, each against an oracle the test computes itself: the option's formula from its
paper (or kohya's documentation), over diffusers' DDPMScheduler, never our own code run a second time.

Most checks drive ``diffusion_loss`` with a stand-in UNet that knows the forward process: with zero latents the
noisy input is sqrt(1 - alpha_bar) * noise, so the stand-in can return the exact target plus an error the test
chooses, and the loss is then a known function of that error and the drawn timesteps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_config
from PIL import Image

from lora_train.cli import main
from lora_train.engine.config.settings import ConfigError, TrainConfig
from lora_train.engine.config.yaml_io import from_dict
from lora_train.engine.data import dataset
from lora_train.engine.data.masks import MaskCache
from lora_train.engine.model import Conditioning
from lora_train.engine.output.export import read_lora
from lora_train.engine.train import noise, trainer
from lora_train.engine.train.loss import diffusion_loss


@pytest.fixture(scope="module")
def alphas() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear").alphas_cumprod


class OracleUNet:
    """A stand-in bundle for zero latents: recovers the noise that went into its input from the forward process
    x_t = sqrt(1 - alpha_bar_t) * noise, and answers ``answer(recovered, t)``; records every timestep."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, alphas: torch.Tensor, parameterization: str = "eps", answer=None):
        self.alphas, self.parameterization = alphas, parameterization
        self.answer = answer or (lambda recovered, t: recovered)
        self.seen: list[torch.Tensor] = []

    def target_of(self, recovered: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The paper's target for zero latents: the noise (eps), or sqrt(alpha_bar) * noise (v)."""
        return recovered if self.parameterization == "eps" else self.alphas[t].sqrt().view(-1, 1, 1, 1) * recovered

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.seen.append(t.clone())
        recovered = noisy / (1 - self.alphas[t]).sqrt().view(-1, 1, 1, 1)
        return self.answer(recovered, t)


def _loss(cfg: TrainConfig, unet: OracleUNet, shape=(8, 4, 16, 16), seed=0, masks=None, latents=None) -> float:
    latents = torch.zeros(shape) if latents is None else latents
    generator = torch.Generator().manual_seed(seed)
    return float(diffusion_loss(cfg, unet, latents, Conditioning(torch.zeros(1)), unet.alphas, generator,
                                masks=masks))


def _snr(alphas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar) (Kingma et al. 2021)."""
    return alphas[t] / (1 - alphas[t])


# ---- timesteps ------------------------------------------------------------------------------------------------

def test_min_and_max_timestep_bound_every_drawn_timestep(alphas):
    unet = OracleUNet(alphas)
    cfg = TrainConfig(min_timestep=200, max_timestep=400)
    for seed in range(20):
        _loss(cfg, unet, shape=(256, 1, 2, 2), seed=seed)
    drawn = torch.cat(unet.seen)
    assert 200 <= int(drawn.min()) and int(drawn.max()) < 400  # kohya: [min, max)
    assert int(drawn.min()) <= 202 and int(drawn.max()) >= 397  # and the whole range is used
    unet.seen.clear()
    _loss(TrainConfig(min_timestep=500, max_timestep=500), unet, shape=(64, 1, 2, 2))
    assert set(unet.seen[0].tolist()) == {500}  # one timestep when both ends are equal
    unet.seen.clear()
    _loss(TrainConfig(max_timestep=10), unet, shape=(512, 1, 2, 2))
    assert set(unet.seen[0].tolist()) == set(range(10))


def test_timestep_range_bounds_a_real_run_and_is_in_the_metadata(tiny, dataset_dir, tmp_path):
    seen = []
    predict = tiny.predict

    def recording(noisy, t, cond):
        seen.append(t.clone())
        return predict(noisy, t, cond)

    tiny.predict = recording
    result = trainer.train(make_config(dataset_dir, tmp_path, max_train_steps=4, min_timestep=100,
                                       max_timestep=300), tiny)
    drawn = torch.cat(seen)
    assert len(drawn) == 8 and all(100 <= t < 300 for t in drawn.tolist())
    _, meta = read_lora(result.output)
    assert meta["modelspec.timestep_range"] == "100,300"


# ---- input perturbation and noise offset ----------------------------------------------------------------------

def test_ip_noise_gamma_perturbs_the_input_but_not_the_target(alphas):
    """Ning et al. 2023: x_t = sqrt(a) x0 + sqrt(1 - a) (eps + gamma xi), target eps. A UNet that returns what its
    input holds is then off by gamma * xi: loss gamma^2 (and 0 without perturbation)."""
    unet = OracleUNet(alphas)
    assert _loss(TrainConfig(), unet) < 1e-10
    gamma = 0.3
    assert _loss(TrainConfig(ip_noise_gamma=gamma), unet, shape=(8, 4, 64, 64)) == pytest.approx(gamma**2, rel=0.03)
    # random strength: gamma drawn uniformly in [0, gamma) per step, so E[loss] = gamma^2 / 3
    cfg = TrainConfig(ip_noise_gamma=gamma, ip_noise_gamma_random_strength=True)
    losses = [_loss(cfg, unet, shape=(1, 4, 32, 32), seed=s) for s in range(400)]
    assert np.mean(losses) == pytest.approx(gamma**2 / 3, rel=0.12)
    assert max(losses) < gamma**2 * 1.2 and min(losses) < gamma**2 / 50


def _channel_mean_variance(cfg: TrainConfig, latents: torch.Tensor, seeds: int) -> float:
    """Variance over images, channels and steps of each noise map's spatial mean (the offset's share)."""
    means = [noise.training_noise(cfg, latents, torch.Generator().manual_seed(s)).mean(dim=(2, 3))
             for s in range(seeds)]
    return float(torch.stack(means).pow(2).mean())


def test_noise_offset_random_strength_and_adaptive_scale():
    """Offset noise (crosslabs.org): eps + s * N(0, 1) per image and channel. Random strength draws s in
    [0, offset) per step, E[s^2] = offset^2 / 3; adaptive scale adds scale * |channel mean| to s."""
    latents = torch.zeros(8, 4, 64, 64)
    iid = 1 / (64 * 64)  # the spatial mean of plain Gaussian noise
    full = _channel_mean_variance(TrainConfig(noise_offset=0.5), latents, 30)
    assert full == pytest.approx(0.25 + iid, rel=0.15)
    random_strength = _channel_mean_variance(TrainConfig(noise_offset=0.5, noise_offset_random_strength=True),
                                             latents, 300)
    assert random_strength == pytest.approx(0.25 / 3 + iid, rel=0.2)
    shifted = torch.zeros(8, 4, 64, 64)
    shifted[:, 0], shifted[:, 1] = 2.0, -3.0  # channel means 2 and -3: strengths 0.1 + 0.5 * 2 and 0.1 + 0.5 * 3
    cfg = TrainConfig(noise_offset=0.1, adaptive_noise_scale=0.5)
    means = torch.stack([noise.training_noise(cfg, shifted, torch.Generator().manual_seed(s)).mean(dim=(2, 3))
                         for s in range(40)])
    assert float(means[:, :, 0].pow(2).mean()) == pytest.approx(1.1**2 + iid, rel=0.15)
    assert float(means[:, :, 1].pow(2).mean()) == pytest.approx(1.6**2 + iid, rel=0.15)
    assert float(means[:, :, 2].pow(2).mean()) == pytest.approx(0.1**2 + iid, rel=0.3)


# ---- multires noise -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("discount", [0.3, 0.8])
def test_multires_noise_has_the_documented_per_level_variance(discount):
    """Multires noise: level i adds N(0, 1) at 1/r^i of the size times discount^i, and the sum is rescaled to unit
    variance. On 2x2 latents level 1 is already 1x1 (r >= 2), a constant of std discount: each pixel is
    eps + eps0 + discount * c, so two pixels of a map correlate by discount^2 / (2 + discount^2)."""
    latents = torch.zeros(4096, 4, 2, 2)
    cfg = TrainConfig(multires_noise_iterations=6, multires_noise_discount=discount)
    result = noise.training_noise(cfg, latents, torch.Generator().manual_seed(3))
    assert float(result.std()) == pytest.approx(1.0, abs=1e-4)
    a, b = result[:, :, 0, 0].flatten(), result[:, :, 1, 1].flatten()
    correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert correlation == pytest.approx(discount**2 / (2 + discount**2), abs=0.03)
    one_level = noise.training_noise(TrainConfig(multires_noise_iterations=1), latents,
                                     torch.Generator().manual_seed(3))
    plain = torch.corrcoef(torch.stack([one_level[:, :, 0, 0].flatten(), one_level[:, :, 1, 1].flatten()]))
    assert abs(float(plain[0, 1])) < 0.03  # level 0 alone is white noise


def test_multires_noise_puts_its_discounted_levels_into_low_frequencies():
    """On a 64x64 map the coarse levels (std discount^i) dominate the spatial mean, which plain Gaussian noise
    leaves at variance 1/4096."""
    latents = torch.zeros(64, 4, 64, 64)
    cfg = TrainConfig(multires_noise_iterations=8, multires_noise_discount=0.8)
    result = noise.training_noise(cfg, latents, torch.Generator().manual_seed(1))
    assert float(result.std()) == pytest.approx(1.0, abs=1e-4)
    assert float(result.mean(dim=(2, 3)).pow(2).mean()) > 50 / 4096


# ---- loss types -----------------------------------------------------------------------------------------------

def _pseudo_huber(delta: float, c: torch.Tensor) -> torch.Tensor:
    """Pseudo-Huber loss 2c(sqrt(d^2 + c^2) - c) (Khrapov et al. 2024), in float64."""
    c = c.double()
    return 2 * c * (torch.sqrt(delta**2 + c**2) - c)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_loss_follows_its_schedule(alphas, schedule):
    delta = 0.5
    unet = OracleUNet(alphas, answer=lambda recovered, t: recovered + delta)
    cfg = TrainConfig(loss_type="huber", huber_schedule=schedule, huber_c=0.2, huber_scale=1.5)
    loss = _loss(cfg, unet, shape=(64, 1, 4, 4))
    t = unet.seen[0]
    if schedule == "constant":
        c = torch.full((len(t),), 0.2 * 1.5)
    elif schedule == "exponential":  # from 1 at t=0 down to huber_c at t=T, times huber_scale
        c = 0.2 ** (t.double() / 1000) * 1.5
    else:  # (1 - c) / (1 + sigma)^2 + c, sigma = sqrt((1 - alpha_bar) / alpha_bar); kohya applies no scale here
        sigma = ((1 - alphas[t].double()) / alphas[t].double()).sqrt()
        c = (1 - 0.2) / (1 + sigma) ** 2 + 0.2
    assert loss == pytest.approx(float(_pseudo_huber(delta, c).mean()), rel=1e-5)


def test_huber_with_a_huge_c_is_l2_and_smooth_l1_and_l1_follow_their_formulas(alphas):
    errors = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    unet = OracleUNet(alphas, answer=lambda recovered, t: recovered + errors)
    l2 = float(errors.double().pow(2).mean())
    assert _loss(TrainConfig(), unet, shape=errors.shape) == pytest.approx(l2, rel=1e-5)
    huge = TrainConfig(loss_type="huber", huber_schedule="constant", huber_c=1e8)
    assert _loss(huge, unet, shape=errors.shape) == pytest.approx(l2, rel=1e-5)
    assert _loss(TrainConfig(loss_type="l1"), unet, shape=errors.shape) == pytest.approx(
        float(errors.double().abs().mean()), rel=1e-5)
    smooth = TrainConfig(loss_type="smooth_l1", huber_schedule="constant", huber_c=0.3)
    expected = (2 * (torch.sqrt(errors.double() ** 2 + 0.09) - 0.3)).mean()
    assert _loss(smooth, unet, shape=errors.shape) == pytest.approx(float(expected), rel=1e-5)


def test_huber_with_a_huge_c_trains_the_tiny_model_like_l2(tiny, dataset_dir, tmp_path):
    run = trainer.Trainer(make_config(dataset_dir, tmp_path), tiny)
    huber = trainer.Trainer(make_config(dataset_dir, tmp_path, loss_type="huber", huber_schedule="constant",
                                        huber_c=1e8), tiny)
    with torch.no_grad():
        assert float(huber._loss([0, 1], seed=3)) == pytest.approx(float(run._loss([0, 1], seed=3)), rel=1e-5)


# ---- debiased estimation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_debiased_estimation_weights_by_inverse_root_snr(alphas, parameterization):
    """Yu et al. 2024: weight 1/sqrt(SNR(t)) (kohya caps SNR at 1000; v-prediction 1/(SNR + 1)). A UNet off by
    exactly 1 everywhere has per-sample l2 = 1, so the loss is the mean weight of the drawn timesteps."""
    unet = OracleUNet(alphas, parameterization)
    unet.answer = lambda recovered, t: unet.target_of(recovered, t) + 1.0
    loss = _loss(TrainConfig(debiased_estimation_loss=True), unet, shape=(64, 1, 2, 2))
    snr = torch.clamp(_snr(alphas, unet.seen[0]).double(), max=1000)
    weights = 1 / (snr + 1) if parameterization == "v" else 1 / snr.sqrt()
    assert loss == pytest.approx(float(weights.mean()), rel=1e-5)
    assert _loss(TrainConfig(), unet, shape=(64, 1, 2, 2)) == pytest.approx(1.0, rel=1e-5)


# ---- masked loss ----------------------------------------------------------------------------------------------

class PixelwiseUNet(torch.nn.Module):
    """A trainable 1x1 convolution: each output pixel sees only its own input pixel, as a mask test needs."""

    dtype = torch.float32
    device = torch.device("cpu")
    parameterization = "eps"

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def predict(self, noisy, t, cond):
        return self.conv(noisy)


def test_pixels_outside_the_mask_do_not_change_the_gradient(alphas):
    torch.manual_seed(0)
    model = PixelwiseUNet()
    latents = torch.randn(2, 4, 8, 8)
    masks = torch.ones(2, 1, 8, 8)
    masks[:, :, :, :4] = 0  # the left half is masked out

    def gradient(x: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        cfg = TrainConfig(masked_loss=True, alpha_mask=True)
        diffusion_loss(cfg, model, x, Conditioning(torch.zeros(1)), alphas, torch.Generator().manual_seed(1),
                       masks=masks).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    base = gradient(latents)
    outside = latents.clone()
    outside[:, :, :, :4] = torch.randn(2, 4, 8, 4) * 5
    torch.testing.assert_close(gradient(outside), base)
    inside = latents.clone()
    inside[:, :, :, 4:] += 1.0
    assert not torch.allclose(gradient(inside), base)  # the test can fail: the kept half does count


def _rgba(path: Path, size=(128, 96), transparent_left=20) -> np.ndarray:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    pixels[:, :, 3] = 255
    pixels[:, :transparent_left, 3] = 0
    pixels[:4, -8:, 3] = 128  # a half-transparent corner
    Image.fromarray(pixels, "RGBA").save(path)
    return pixels[:, :, 3].astype(np.float64) / 255


def _block_mean(mask: np.ndarray, factor: int) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def test_alpha_mask_and_mask_images_become_latent_masks(tmp_path):
    """kohya: alpha / 255 (alpha_mask) or the mask image's red channel / 255, area-averaged to the latent size."""
    data, masks_dir = tmp_path / "data", tmp_path / "masks"
    data.mkdir(), masks_dir.mkdir()
    alpha = _rgba(data / "a.png")
    (data / "a.txt").write_text("a")
    Image.new("RGB", (40, 40), (10, 20, 30)).save(data / "b.jpg")  # no alpha: trains everywhere
    (data / "b.txt").write_text("b")
    common = dict(train_data_dir=str(data), resolution="128,96", enable_bucket=False)
    ds = dataset.scan(TrainConfig(alpha_mask=True, **common))
    got = MaskCache(ds, torch.device("cpu")).batch([0, 1], (12, 16))
    np.testing.assert_allclose(got[0, 0].numpy(), _block_mean(alpha, 8), atol=1e-6)
    assert torch.equal(got[1], torch.ones(1, 12, 16))
    red = np.zeros((96, 128, 3), dtype=np.uint8)
    red[:, 60:, 0] = 255  # white-ish on the right: trains there; green and blue do not count
    red[:, :, 1:] = 255
    Image.fromarray(red).save(masks_dir / "a.png")
    Image.new("RGB", (40, 40), (255, 0, 0)).save(masks_dir / "b.webp")
    ds = dataset.scan(TrainConfig(masked_loss=True, conditioning_data_dir=str(masks_dir), **common))
    got = MaskCache(ds, torch.device("cpu")).batch([0], (12, 16))
    np.testing.assert_allclose(got[0, 0].numpy(), _block_mean(red[:, :, 0] / 255.0, 8), atol=1e-6)


def test_mask_folder_problems_are_reported_together(tmp_path, dataset_dir):
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    Image.new("RGB", (32, 32)).save(masks_dir / "00_red_circle.png")  # the image is 64x64
    Image.new("RGB", (64, 64)).save(masks_dir / "stray.png")
    cfg = TrainConfig(train_data_dir=str(dataset_dir), masked_loss=True, conditioning_data_dir=str(masks_dir))
    with pytest.raises(dataset.DatasetError) as info:
        dataset.scan(cfg)
    message = str(info.value)
    others = len(list(dataset_dir.glob("*.png"))) - 1
    assert f"{others} image(s) without a mask" in message and "01_blue_square.png" in message
    assert "00_red_circle.png is 32x32" in message and "stray" in message and "match no training image" in message


# ---- config ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, key", [
    ({"multires_noise_iterations": -1}, "multires_noise_iterations"),
    ({"multires_noise_discount": 1.5}, "multires_noise_discount"),
    ({"ip_noise_gamma": -0.1}, "ip_noise_gamma"),
    ({"adaptive_noise_scale": 0.01}, "adaptive_noise_scale"),
    ({"min_timestep": 1000}, "min_timestep"),
    ({"max_timestep": 0}, "max_timestep"),
    ({"min_timestep": 600, "max_timestep": 500}, "min_timestep"),
    ({"loss_type": "l3"}, "loss_type"),
    ({"huber_schedule": "cosine"}, "huber_schedule"),
    ({"huber_c": 0}, "huber_c"),
    ({"huber_scale": -1}, "huber_scale"),
    ({"debiased_estimation_loss": "maybe"}, "debiased_estimation_loss"),
    ({"masked_loss": True}, "masked_loss"),
    ({"conditioning_data_dir": "masks"}, "conditioning_data_dir"),
    ({"masked_loss": True, "alpha_mask": True, "conditioning_data_dir": "m"}, "alpha_mask"),
    ({"noise_offset_random_strength": 3}, "noise_offset_random_strength"),
])
def test_bad_values_are_one_line_errors_naming_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        from_dict(values)
    assert info.value.key == key and "\n" not in str(info.value) and f"'{key}'" in str(info.value)


def _kohya_config(folder: Path, dataset_dir: Path, base_model: str, **extra) -> Path:
    """A config as kohya's train_network.py arguments spell it, with every noise and loss key."""
    config = {
        "pretrained_model_name_or_path": base_model, "train_data_dir": str(dataset_dir), "output_dir": str(folder),
        "output_name": "kohya", "resolution": "64", "min_bucket_reso": 64, "max_bucket_reso": 128,
        "bucket_reso_steps": 32, "network_dim": 4, "network_alpha": 2, "train_batch_size": 2,
        "max_train_steps": 3, "learning_rate": 1e-3, "network_train_unet_only": True,
        "noise_offset": 0.05, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.01,
        "multires_noise_iterations": 6, "multires_noise_discount": 0.3, "ip_noise_gamma": 0.1,
        "ip_noise_gamma_random_strength": True, "min_timestep": 100, "max_timestep": 900,
        "loss_type": "smooth_l1", "huber_schedule": "snr", "huber_c": 0.1, "huber_scale": 1.0,
        "min_snr_gamma": 5, "debiased_estimation_loss": True, "masked_loss": True, "alpha_mask": True,
        **extra,
    }
    path = folder / "kohya.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("base_model", ["tiny", "tiny-sdxl"])
def test_a_kohya_config_with_every_key_trains_verbatim_from_the_cli(tmp_path, dataset_dir, base_model, capsys):
    _rgba(dataset_dir / "00_red_circle.png", size=(64, 64))  # one image with a transparent part
    config = _kohya_config(tmp_path, dataset_dir, base_model)
    assert main(["train", "--config", str(config)]) == 0
    _, meta = read_lora(tmp_path / "kohya.safetensors")
    expected = {
        "ss_noise_offset": "0.05", "ss_noise_offset_random_strength": "True", "ss_adaptive_noise_scale": "0.01",
        "ss_multires_noise_iterations": "6", "ss_multires_noise_discount": "0.3", "ss_ip_noise_gamma": "0.1",
        "ss_ip_noise_gamma_random_strength": "True", "ss_loss_type": "smooth_l1", "ss_huber_schedule": "snr",
        "ss_huber_c": "0.1", "ss_huber_scale": "1.0", "ss_min_snr_gamma": "5.0", "ss_debiased_estimation": "True",
        "ss_masked_loss": "True", "ss_alpha_mask": "True", "modelspec.timestep_range": "100,900",
    }
    assert {key: meta.get(key) for key in expected} == expected


def test_mask_images_folder_trains_from_the_cli(tmp_path, dataset_dir):
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    for image in dataset_dir.glob("*.png"):
        with Image.open(image) as source:
            Image.new("L", source.size, 255).save(masks_dir / f"{image.stem}.png")
    config = _kohya_config(tmp_path, dataset_dir, "tiny", alpha_mask=False, conditioning_data_dir="masks",
                           loss_type="huber", huber_schedule="exponential")
    assert main(["train", "--config", str(config)]) == 0  # the relative folder is read next to the config
    _, meta = read_lora(tmp_path / "kohya.safetensors")
    assert meta["ss_masked_loss"] == "True" and "ss_alpha_mask" not in meta and meta["ss_loss_type"] == "huber"


def test_defaults_change_nothing_and_write_kohyas_defaults(tiny, dataset_dir, tmp_path):
    result = trainer.train(make_config(dataset_dir, tmp_path, max_train_steps=1), tiny)
    _, meta = read_lora(result.output)
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"], meta["ss_huber_scale"]) == (
        "l2", "snr", "0.1", "1.0")
    assert meta["ss_debiased_estimation"] == "False" and meta["ss_multires_noise_discount"] == "0.3"
    for key in ("ss_ip_noise_gamma", "ss_multires_noise_iterations", "ss_masked_loss", "modelspec.timestep_range"):
        assert key not in meta


def test_reg_images_train_everywhere_with_a_mask_folder(tmp_path, dataset_dir):
    reg = tmp_path / "reg"
    reg.mkdir()
    shutil.copy(dataset_dir / "00_red_circle.png", reg / "r.png")
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    for image in dataset_dir.glob("*.png"):
        with Image.open(image) as source:
            Image.new("L", source.size, 0).save(masks_dir / f"{image.stem}.png")
    cfg = TrainConfig(train_data_dir=str(dataset_dir), reg_data_dir=str(reg), masked_loss=True,
                      conditioning_data_dir=str(masks_dir), resolution="64")
    ds = dataset.scan(cfg)
    reg_index = next(i for i, item in enumerate(ds.items) if item.is_reg)
    got = MaskCache(ds, torch.device("cpu")).batch([0, reg_index], (8, 8))
    assert float(got[0].max()) == 0.0 and float(got[1].min()) == 1.0


@pytest.mark.parametrize("options", [
    dict(noise_offset=0.1, noise_offset_random_strength=True, multires_noise_iterations=4, ip_noise_gamma=0.1,
         ip_noise_gamma_random_strength=True, min_timestep=100, max_timestep=800, loss_type="huber",
         debiased_estimation_loss=True),
    dict(noise_offset=0.1, adaptive_noise_scale=0.5, loss_type="smooth_l1", huber_schedule="exponential"),
], ids=["multires", "adaptive"])
def test_each_process_draws_its_rows_of_the_global_batch(alphas, options):
    """With several processes each one's rows get the noise, timesteps and mask one process gives those rows."""
    unet = OracleUNet(alphas, answer=lambda recovered, t: recovered * 0.5)
    cfg = TrainConfig(masked_loss=True, alpha_mask=True, **options)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    masks = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    cond = Conditioning(torch.zeros(1))

    def loss(rows: slice | None) -> torch.Tensor:
        part = slice(None) if rows is None else rows
        return diffusion_loss(cfg, unet, latents[part], cond, alphas, torch.Generator().manual_seed(3),
                              masks=masks[part], rows_of=None if rows is None else (rows, 4))

    halves = (loss(slice(0, 2)) + loss(slice(2, 4))) / 2
    torch.testing.assert_close(halves, loss(None), rtol=1e-6, atol=0)
