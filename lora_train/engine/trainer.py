"""The training loop: load data, freeze, add LoRA, loop, save. Reads top to bottom like diffusers' example.

Every random draw of step ``k`` comes from a seed derived from (seed, k), and batches from (seed, epoch), so
a run resumed from a checkpoint ends with the same weights as one that never stopped (bit for bit on CPU; on
a GPU up to its nondeterministic kernels). Where files go is run_paths', resumable state run_state's.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from lora_train.engine import dataset as data
from lora_train.engine import export, lora, run_state
from lora_train.engine.config import TrainConfig
from lora_train.engine.files import atomic_write, free_path
from lora_train.engine.model import Conditioning, ModelBundle, Parameterization
from lora_train.engine.optim import make_grad_scaler, make_optimizer, make_scheduler, optimizer_step
from lora_train.engine.run_paths import RunPaths, check_writable, reserve_run

SampleFn = Callable[[ModelBundle, list[str], int], list[Image.Image]]


@dataclass
class StepInfo:
    """What a progress display needs after each optimizer step.

    ``loss`` is the mean since the last reading, read from the device every ``log_every_n_steps`` only (each
    read waits for the GPU); on the other steps it is None.
    """

    step: int
    total_steps: int
    epoch: int
    loss: float | None
    lr: float
    it_per_s: float
    eta_s: float


class TrainCallbacks:
    """Override what you need; the CLI prints with tqdm, the WebUI tab updates its widgets."""

    def on_start(self, total_steps: int, start_step: int) -> None: ...
    def on_step(self, info: StepInfo) -> None: ...
    def on_sample(self, step: int, images: list[Image.Image]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_log(self, message: str) -> None: ...
    def should_stop(self) -> bool:
        return False


@dataclass
class TrainResult:
    """``facts`` holds the run's real numbers (rank, alpha, lrs, epochs); ``state`` the folder to resume from."""

    output: Path | None
    steps: int
    total_steps: int
    stopped: bool
    loss_history: list[float] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    facts: export.RunFacts | None = None
    state: Path | None = None


class NonFiniteError(RuntimeError):
    """The loss, a latent or the weights became NaN/inf; nothing non-finite was written."""


class OutputWriteError(OSError):
    """The final file could not be written where asked; the message says where the LoRA was saved instead."""


# ---------------------------------------------------------------------------------------------- loss
def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    alpha = alphas_cumprod[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def loss_target(
    parameterization: Parameterization, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """What the UNet should output: the noise (eps models) or the velocity (v-prediction models)."""
    if parameterization == "eps":
        return noise
    alpha = alphas_cumprod[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return alpha.sqrt() * noise - (1 - alpha).sqrt() * latents


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, parameterization: Parameterization
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023); v-prediction divides by SNR+1 instead of SNR."""
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if parameterization == "v" else clipped / snr


# ------------------------------------------------------------------------------------- model state
@dataclass
class ModuleFlags:
    """requires_grad and train/eval of every host module, restored after training whatever happens."""

    grads: list[tuple[nn.Parameter, bool]]
    modes: list[tuple[nn.Module, bool]]

    @classmethod
    def capture(cls, modules: list[nn.Module]) -> ModuleFlags:
        grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        modes = [(sub, sub.training) for m in modules for sub in m.modules()]
        return cls(grads, modes)

    def restore(self) -> None:
        for param, flag in self.grads:
            param.requires_grad_(flag)
        for module, flag in self.modes:
            module.train(flag)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------- train
class Trainer:
    """One training run over a bundle. ``run()`` always removes the LoRA and restores the host's flags."""

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, callbacks: TrainCallbacks | None = None,
                 sample_fn: SampleFn | None = None, final_dir: str | Path | None = None):
        self.cfg = cfg
        self.bundle = bundle
        self.callbacks = callbacks or TrainCallbacks()
        self.sample_fn = sample_fn
        self.device = bundle.device
        self.dataset = data.scan(cfg)
        self.batches_per_epoch = len(data.epoch_batches(self.dataset, cfg.batch_size, cfg.seed, 0))
        micro_total = cfg.epochs * self.batches_per_epoch
        self.total_steps = cfg.max_train_steps or math.ceil(micro_total / cfg.gradient_accumulation_steps)
        self.resume = run_state.read(cfg.resume) if cfg.resume else None
        self.paths = self._run_paths(Path(final_dir or cfg.output_dir))
        self.last_good: Path | None = self.resume.folder if self.resume else None
        self.started_at = time.time()
        self.latents: dict[int, torch.Tensor] = {}
        self.text_cache: dict[str, Conditioning] = {}
        self.size_ids: dict[int, torch.Tensor] = {}
        uncached = not (cfg.cache_latents or cfg.cache_latents_to_disk)
        self.loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lora-images") if uncached else None
        self.pending: dict[int, Future] = {}
        self.alphas = bundle.alphas_cumprod.to(self.device)
        self.has_reg = any(item.is_reg for item in self.dataset.items)

    def _run_paths(self, final_dir: Path) -> RunPaths:
        """A new run reserves a free name; a resumed one keeps its name, unless it would replace a finished file."""
        cfg, resumed = self.cfg, self.resume
        if resumed is None:
            return reserve_run(final_dir, cfg.output_dir, cfg.output_name, cfg.overwrite)
        same = RunPaths.of(final_dir, cfg.output_dir, resumed.output_name)
        if resumed.finished and same.final.exists() and not cfg.overwrite:
            return reserve_run(final_dir, cfg.output_dir, resumed.output_name)
        return same

    # -- data -----------------------------------------------------------------------------------
    def _micro_batches(self, start_micro: int) -> Iterator[tuple[int, list[int]]]:
        """(epoch, item indices) for every micro-batch from ``start_micro`` on, epochs repeating as needed."""
        micro = start_micro
        while True:
            epoch, index = divmod(micro, self.batches_per_epoch)
            batches = data.epoch_batches(self.dataset, self.cfg.batch_size, self.cfg.seed, epoch)
            for batch in batches[index:]:
                yield epoch, batch
                micro += 1

    def _prefetched(self, batches: Iterator[tuple[int, list[int]]]) -> Iterator[tuple[int, list[int]]]:
        """Without a latent cache, decode the next batch's images in a thread while this step trains."""
        upcoming = next(batches)
        while True:
            current, upcoming = upcoming, next(batches)
            if self.loader is not None:
                for index in upcoming[1]:
                    if index not in self.pending:
                        self.pending[index] = self.loader.submit(data.load_pixels, self.dataset.items[index])
            yield current

    @torch.no_grad()
    def _encode_latents(self, indices: list[int]) -> torch.Tensor:
        """Latents for a batch, from the memory or disk cache when enabled."""
        latents = []
        for index in indices:
            latent = self.latents.get(index)
            if latent is None:
                latent = self._latent_from_disk(index) if self.cfg.cache_latents_to_disk else None
                if latent is None:
                    item = self.dataset.items[index]
                    pending = self.pending.pop(index, None)
                    pixels, item.crop = pending.result() if pending else data.load_pixels(item)
                    latent = self.bundle.encode_images(pixels[None].to(self.device))[0].float()
                    if self.cfg.cache_latents or self.cfg.cache_latents_to_disk:  # once per image: worth a sync
                        self._check_latent(index, latent)
                    if self.cfg.cache_latents_to_disk:
                        self._latent_to_disk(index, latent.cpu())
                latent = latent.to(self.device)  # cached on the device: no host-to-device copy per step
                if self.cfg.cache_latents:
                    self.latents[index] = latent
            latents.append(latent)
        return torch.stack(latents)

    def _size_ids(self, indices: list[int]) -> torch.Tensor:
        """SDXL's per-sample size conditioning, built on the device once per item."""
        for index in indices:
            if index not in self.size_ids:
                ids = self.dataset.items[index].size_ids()
                self.size_ids[index] = torch.tensor(ids, dtype=torch.float32, device=self.device)
        return torch.stack([self.size_ids[i] for i in indices])

    def _latent_path(self, index: int) -> Path:
        """Keyed by image file, its mtime and size, the bucket and the model, so stale entries are never used."""
        item = self.dataset.items[index]
        stat = item.path.stat()
        key = f"{item.path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{item.bucket}|{self.bundle.model_name}"
        return self.paths.work_dir / ".latent_cache" / f"{hashlib.sha1(key.encode()).hexdigest()}.safetensors"

    def _latent_from_disk(self, index: int) -> torch.Tensor | None:
        path = self._latent_path(index)
        if not path.is_file():
            return None
        stored = load_file(str(path))
        self.dataset.items[index].crop = tuple(int(v) for v in stored["crop"])  # type: ignore[assignment]
        return stored["latent"]

    def _latent_to_disk(self, index: int, latent: torch.Tensor) -> None:
        tensors = {"latent": latent.contiguous(), "crop": torch.tensor(self.dataset.items[index].crop)}
        atomic_write(self._latent_path(index), lambda tmp: save_file(tensors, str(tmp)))

    def _check_latent(self, index: int, latent: torch.Tensor) -> None:
        if not torch.isfinite(latent).all():
            raise NonFiniteError(
                f"{self.dataset.items[index].path}: the VAE gave NaN/inf for this image; the file may be broken "
                "(open and re-save it, or remove it), or the VAE overflowed in half precision")

    def _cache_all_latents(self) -> bool:
        """Encode every image up front when caching; False when a stop was asked for in between."""
        if not (self.cfg.cache_latents or self.cfg.cache_latents_to_disk):
            return True
        self.callbacks.on_log(f"caching latents of {len(self.dataset.items)} image(s)")
        for index in range(len(self.dataset.items)):
            if self.callbacks.should_stop():
                return False
            self._encode_latents([index])
        return True

    def _text(self, captions: list[str]) -> Conditioning:
        """Text conditioning; cached per caption when the text encoders are frozen and captions are fixed."""
        cfg = self.cfg
        if cfg.train_text_encoder or cfg.shuffle_caption or cfg.caption_dropout_rate:
            return self.bundle.encode_text(self.bundle.tokenize(captions))
        missing = [c for c in dict.fromkeys(captions) if c not in self.text_cache]
        if missing:
            with torch.no_grad():
                cond = self.bundle.encode_text(self.bundle.tokenize(missing))
            for i, caption in enumerate(missing):
                pooled = cond.pooled[i : i + 1] if cond.pooled is not None else None
                self.text_cache[caption] = Conditioning(cond.context[i : i + 1], pooled)
        parts = [self.text_cache[c] for c in captions]
        pooled = torch.cat([p.pooled for p in parts]) if parts[0].pooled is not None else None
        return Conditioning(torch.cat([p.context for p in parts]), pooled)

    # -- one step ---------------------------------------------------------------------------------
    def _loss(self, indices: list[int], seed: int) -> torch.Tensor:
        cfg, bundle = self.cfg, self.bundle
        torch.manual_seed(seed)  # LoRA dropout draws from the global generator
        generator = torch.Generator(self.device).manual_seed(seed)
        rng = random.Random(seed)
        latents = self._encode_latents(indices)
        items = [self.dataset.items[i] for i in indices]
        cond = self._text([data.process_caption(item.caption, cfg, rng) for item in items])
        if cond.pooled is not None:
            cond.size_ids = self._size_ids(indices)
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                                    device=self.device)
        alphas = self.alphas
        timesteps = torch.randint(0, len(alphas), (len(indices),), generator=generator, device=self.device)
        noisy = add_noise(latents, noise, timesteps, alphas)
        with _autocast(cfg, self.device):
            prediction = bundle.predict(noisy.to(bundle.dtype), timesteps, cond)
        target = loss_target(bundle.parameterization, latents, noise, timesteps, alphas)
        loss = torch.nn.functional.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            loss = loss * min_snr_weights(timesteps, alphas, cfg.min_snr_gamma, bundle.parameterization)
        if not self.has_reg:
            return loss.mean()
        weights = torch.tensor([cfg.prior_loss_weight if it.is_reg else 1.0 for it in items], device=self.device)
        return (loss * weights).mean()

    # -- saving -----------------------------------------------------------------------------------
    def _epochs_at(self, step: int) -> int:
        """Epochs begun by ``step`` (1-based, as kohya's ss_epoch); at total_steps, the epochs the run has."""
        return math.ceil(step * self.cfg.gradient_accumulation_steps / self.batches_per_epoch)

    def _adapter(self, network: lora.LoraNetwork, dtype: torch.dtype, step: int) -> dict[str, torch.Tensor]:
        """The adapter weights as kohya tensors; refuses NaN/inf so no file ever holds them."""
        tensors = lora.kohya_state_dict(network, dtype)
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise NonFiniteError(f"the LoRA weights became NaN/inf by step {step}; {self._likely_cause()}. "
                                 f"{self._kept()}")
        return tensors

    def _export(self, network: lora.LoraNetwork, path: Path, step: int) -> Path:
        metadata = export.training_metadata(
            self.cfg, self.dataset, self.bundle.family, self.bundle.parameterization, self.bundle.model_name,
            self.facts, step, self._epochs_at(step), self.started_at,
        )
        tensors = self._adapter(network, export.SAVE_DTYPES[self.cfg.save_precision], step)
        return export.write_lora(path, tensors, metadata)

    def _export_final(self, network: lora.LoraNetwork, step: int) -> Path:
        """The finished LoRA; when its folder refuses the write, it goes to the work folder or the temp folder
        and the error says where, so the trained weights are never lost."""
        try:
            return self._export(network, self.paths.final, step)
        except OSError as exc:
            error = exc
        rescues = [self.paths.work_dir / self.paths.final.name, Path(tempfile.gettempdir()) / self.paths.final.name]
        for rescue in rescues:
            if rescue.parent != self.paths.final_dir:
                try:
                    saved = self._export(network, free_path(rescue), step)
                except OSError:
                    continue
                raise OutputWriteError(f"could not write {self.paths.final} ({error}); "
                                       f"the trained LoRA was saved to {saved} instead") from error
        raise OutputWriteError(f"could not write {self.paths.final} ({error}); {self._kept()}") from error

    def _save_state(self, network, optimizer, scheduler, scaler, step: int, history: list[float],
                    finished: bool = False) -> None:
        """Everything resume needs, crash-safe as a whole (see run_state)."""
        adapter = self._adapter(network, torch.float32, step)
        run_state.save(self.paths.state, step, self.paths.name, finished, history, adapter, optimizer, scheduler,
                       scaler)
        self.last_good = self.paths.state

    def _checkpoint(self, network, optimizer, scheduler, scaler, step, history) -> None:
        path = self._export(network, self.paths.step_file(step), step)
        self._save_state(network, optimizer, scheduler, scaler, step, history)
        self.callbacks.on_checkpoint(step, path)

    def _likely_cause(self) -> str:
        if self.cfg.mixed_precision == "fp16":
            return "fp16 overflowed: set mixed_precision to bf16 (or no)"
        return f"the learning rate ({self.facts.unet_lr:g}) is probably too high, or an image is broken"

    def _kept(self) -> str:
        if self.last_good is None:
            return "No checkpoint was saved before it (set save_every_n_steps to keep some)."
        return f"The last good state is kept in {self.last_good} (resume from it)."

    def _sample(self, step: int) -> list[Path]:
        """Preview images with every module in eval mode (no LoRA dropout), as txt2img will see the LoRA."""
        modules = [self.bundle.unet, *self.bundle.text_encoders]
        modes = ModuleFlags.capture(modules)
        for module in modules:
            module.eval()
        try:
            return self._sample_images(step)
        finally:
            modes.restore()

    def _sample_images(self, step: int) -> list[Path]:
        height, width = self.cfg.resolution_hw
        if self.sample_fn:
            images = self.sample_fn(self.bundle, self.cfg.prompts, step)
        else:
            from lora_train.engine.sampler import (
                sample_images,  # diffusers: the CLI's venv has it, the WebUI's need not
            )

            with _autocast(self.cfg, self.device):
                images = sample_images(self.bundle, self.cfg.prompts, height, width, self.cfg.sample_steps,
                                       self.cfg.sample_cfg_scale, seed=self.cfg.seed)
        saved = []
        for index, image in enumerate(images):
            path = self.paths.sample_file(step, index)
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            saved.append(path)
        self.callbacks.on_sample(step, images)
        return saved

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, bundle = self.cfg, self.bundle
        self.paths.check_writable()
        if cfg.tensorboard_dir:
            check_writable(cfg.tensorboard_dir, "logging_dir")
        if self.paths.name != (self.resume.output_name if self.resume else cfg.output_name):
            self.callbacks.on_log(f"{self.paths.name}: a run of that name already has files; nothing is replaced")
        flags = ModuleFlags.capture([bundle.unet, *bundle.text_encoders])
        file_weights = export.read_lora(cfg.network_weights)[0] if cfg.network_weights else None
        rank, alpha = lora.network_dims(file_weights) if file_weights else (cfg.lora_rank, cfg.lora_alpha)
        if file_weights is not None and (rank, alpha) != (cfg.lora_rank, cfg.lora_alpha):
            self.callbacks.on_log(f"network_weights: continuing with the file's rank {rank} and alpha {alpha}")
        self.dims = (rank, alpha)
        has_te_weights = bool(file_weights) and any(k.startswith("lora_te") for k in file_weights)
        targets = bundle.lora_targets(cfg.train_text_encoder or has_te_weights)  # may refuse: nothing changed yet
        network = None
        try:
            for module in (bundle.unet, *bundle.text_encoders):
                module.requires_grad_(False)
                module.eval()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(cfg.seed)
                network = lora.inject(targets, rank, alpha, cfg.lora_dropout)
                if file_weights is not None:
                    lora.load_kohya(network, file_weights, str(cfg.network_weights))
                return self._loop(network)
        finally:
            if network is not None:
                lora.remove(network)
            flags.restore()

    def _loop(self, network: lora.LoraNetwork) -> TrainResult:
        cfg, bundle = self.cfg, self.bundle
        lora.trainable(network.parameters("lora_te"), cfg.train_text_encoder)
        groups = [{"params": network.parameters("lora_unet"), "lr": cfg.unet_lr or cfg.learning_rate}]
        if cfg.train_text_encoder:
            groups.append({"params": network.parameters("lora_te"), "lr": cfg.text_encoder_lr or cfg.learning_rate})
        self.facts = export.RunFacts(
            *self.dims, cfg.learning_rate, groups[0]["lr"], groups[1]["lr"] if len(groups) > 1 else None,
            self._epochs_at(self.total_steps), self.batches_per_epoch, self.total_steps,
        )
        if cfg.optimizer == "prodigy" and min(group["lr"] for group in groups) < 0.1:
            self.callbacks.on_log("prodigy: the learning rate multiplies Prodigy's own step-size estimate and is "
                                  "usually 1.0; a small value like 1e-4 barely trains")
        optimizer = make_optimizer(cfg, groups)
        scheduler = make_scheduler(cfg, optimizer, self.total_steps)
        scaler = make_grad_scaler(self.device, cfg.mixed_precision == "fp16")
        bundle.set_gradient_checkpointing(cfg.gradient_checkpointing)
        bundle.unet.train(cfg.gradient_checkpointing)  # diffusers only checkpoints in train mode
        for layer in network.layers.values():
            layer.train()  # after the host's train(False): LoRA dropout is active, the host modules stay in eval
        channels_last = cfg.channels_last and not getattr(bundle, "shares_host_weights", False)
        if cfg.channels_last and not channels_last:
            self.callbacks.on_log("channels_last is skipped on the WebUI's live model: it would copy the UNet")
        if channels_last:
            bundle.unet.to(memory_format=torch.channels_last)
        if cfg.torch_compile:
            bundle.unet.forward = torch.compile(bundle.unet.forward)
        step, history = 0, []
        if self.resume:
            adapter = run_state.load(self.resume, optimizer, scheduler, scaler, self.device)
            lora.load_kohya(network, adapter, str(self.resume.folder))
            step, history = self.resume.step, list(self.resume.loss_history)
            self.callbacks.on_log(f"resumed from {self.resume.folder} at step {step}")
        writer = None  # made once there is something to log: a run stopped while caching leaves no log
        accumulation = cfg.gradient_accumulation_steps
        params = network.parameters()
        epoch, stopped, samples = 0, False, []
        running = torch.zeros((), device=self.device)
        window = 0
        try:
            if not self._cache_all_latents():
                self.callbacks.on_log("stopped while caching latents; nothing was trained or written")
                return TrainResult(None, step, self.total_steps, True, history, facts=self.facts)
            writer = tensorboard_writer(cfg.tensorboard_dir, self.paths.name)
            self.callbacks.on_start(self.total_steps, step)
            batches = self._prefetched(self._micro_batches(step * accumulation))
            start_time, start_step = time.time(), step
            while step < self.total_steps:
                if self.callbacks.should_stop():
                    stopped = True
                    break
                for micro in range(accumulation):
                    epoch, indices = next(batches)
                    loss = self._loss(indices, seed=cfg.seed * 1_000_003 + step * accumulation + micro)
                    scaler.scale(loss / accumulation).backward()
                    running += loss.detach() / accumulation
                optimizer_step(optimizer, scheduler, scaler, params, cfg.max_grad_norm)
                step += 1
                window += 1
                loss_value = None
                if window == cfg.log_every_n_steps or step == self.total_steps:
                    loss_value = running.item() / window  # the only host-device sync in the loop
                    running.zero_()
                    window = 0
                    if not math.isfinite(loss_value):
                        raise NonFiniteError(f"the loss became {loss_value} by step {step}; {self._likely_cause()}."
                                             f" {self._kept()}")
                    history.append(loss_value)
                self._report(step, epoch, loss_value, scheduler.get_last_lr()[0], start_time, start_step, writer)
                if step < self.total_steps and self._checkpoint_due(step):
                    self._checkpoint(network, optimizer, scheduler, scaler, step, history)
                if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
                    samples += self._sample(step)
        finally:
            if writer:
                writer.close()
            if self.loader is not None:
                self.loader.shutdown(wait=False, cancel_futures=True)
            bundle.set_gradient_checkpointing(False)
            if cfg.torch_compile:
                del bundle.unet.forward  # back to the class's forward
            if channels_last:  # same values, the host's original memory layout
                bundle.unet.to(memory_format=torch.contiguous_format)
        if stopped:
            self.callbacks.on_log(f"stopped at step {step}/{self.total_steps}; saving what was trained")
        if step == 0:
            return TrainResult(None, step, self.total_steps, stopped, history, samples, self.facts)
        # state first: a finished run can be resumed to train longer, and it holds the weights if the export fails
        self._save_state(network, optimizer, scheduler, scaler, step, history, finished=not stopped)
        output = self._export_final(network, step)
        return TrainResult(output, step, self.total_steps, stopped, history, samples, self.facts, self.paths.state)

    def _checkpoint_due(self, step: int) -> bool:
        cfg = self.cfg
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
            return True
        if not cfg.save_every_n_epochs:
            return False
        accumulation = cfg.gradient_accumulation_steps
        micro = step * accumulation
        epochs_done = micro // self.batches_per_epoch
        epoch_ended = epochs_done != (micro - accumulation) // self.batches_per_epoch
        return epoch_ended and epochs_done % cfg.save_every_n_epochs == 0

    def _report(self, step, epoch, loss, lr, start_time, start_step, writer) -> None:
        elapsed = time.time() - start_time
        rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate else 0.0
        self.callbacks.on_step(StepInfo(step, self.total_steps, epoch, loss, lr, rate, eta))
        if writer and loss is not None:
            writer.add_scalar("loss/train", loss, step)
            writer.add_scalar("lr/unet", lr, step)



def tensorboard_writer(folder: Path | None, run_name: str):
    """A SummaryWriter in ``folder/<run_name>-<time>`` (one run per subfolder, as TensorBoard lists them), or None."""
    if folder is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"))


def train(cfg: TrainConfig, bundle: ModelBundle, callbacks: TrainCallbacks | None = None,
          sample_fn: SampleFn | None = None, final_dir: str | Path | None = None) -> TrainResult:
    """Train a LoRA on ``bundle`` as ``cfg`` says.

    The final file goes to ``final_dir`` (default ``cfg.output_dir``); step files, resumable state and samples
    to ``cfg.output_dir``. Names are reserved for all of them together (run_paths.reserve_run).
    """
    return Trainer(cfg, bundle, callbacks, sample_fn, final_dir).run()
