"""The training loop: load data, freeze, add LoRA, loop, save. Reads top to bottom like diffusers' example.

Every random draw of step ``k`` comes from a seed derived from (seed, k), and batches from (seed, epoch), so
a run resumed from a checkpoint ends with the same weights as one that never stopped (bit for bit on CPU; on
a GPU up to its nondeterministic kernels). The parts it drives, in the order data flows through them: caches
(latents, text), loss, checkpoints (every file of the LoRA), samples (previews, TensorBoard); where files go
is run_paths', resumable state run_state's, what the caller hears progress'. On N processes (distributed's
``Team``) every step trains one global batch of ``batch_size x N`` and only rank 0 writes.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import dataset as data
from lora_train.engine.data.caches import LatentCache, TextCache
from lora_train.engine.data.masks import MaskCache, uses_masks
from lora_train.engine.data.split import split_for_run
from lora_train.engine.model import ModelBundle
from lora_train.engine.network import lora
from lora_train.engine.network.module_flags import ModuleFlags
from lora_train.engine.output import export
from lora_train.engine.output.run_paths import check_writable, plan_run
from lora_train.engine.train import run_state
from lora_train.engine.train.checkpoints import RunWriter
from lora_train.engine.train.distributed import SOLO, Team
from lora_train.engine.train.loss import diffusion_loss
from lora_train.engine.train.optim import (
    make_grad_scaler,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    param_groups,
)
from lora_train.engine.train.progress import NonFiniteError, StepInfo, TrainCallbacks, TrainResult
from lora_train.engine.train.samples import SampleFn, sample, tensorboard_writer
from lora_train.engine.train.schedules import training_alphas
from lora_train.engine.train.validation import Validator


class Trainer:
    """One training run over a bundle. ``run()`` always removes the LoRA and restores the host's flags."""

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, callbacks: TrainCallbacks | None = None,
                 sample_fn: SampleFn | None = None, final_dir: str | Path | None = None,
                 dataset: data.Dataset | None = None, team: Team = SOLO):
        self.cfg = cfg
        self.team = team
        self.bundle = bundle
        self.callbacks = callbacks or TrainCallbacks()
        self.sample_fn = sample_fn
        self.device = bundle.device
        scanned = dataset if dataset is not None else data.scan(cfg)
        self.dataset, held_out = split_for_run(scanned, cfg)
        self.global_batch = cfg.batch_size * team.world  # what one step trains, over all processes
        self.batches_per_epoch, self.total_steps = data.run_length(self.dataset, cfg, self.global_batch)
        self.resume = run_state.read(cfg.resume, team.world) if cfg.resume else None
        self.paths = team.from_main(lambda: plan_run(final_dir or cfg.output_dir, cfg.output_dir, cfg.output_name,
                                                     cfg.overwrite, self.resume))
        self.saver = RunWriter(cfg, bundle, self.dataset, self.paths, self.batches_per_epoch,
                                self.resume.folder if self.resume else None, team.world)
        self.latents = LatentCache(cfg, bundle, self.dataset, self.paths.work_dir)
        self.text = TextCache(cfg, bundle)
        self.masks = MaskCache(self.dataset, self.device) if uses_masks(cfg) else None
        self.alphas = training_alphas(cfg, bundle, self.device)
        self.validator = (Validator(cfg, bundle, held_out, self.text, self.paths.work_dir, self.alphas)
                          if held_out.items else None)
        self.saver.validator = self.validator
        self.has_reg = any(item.is_reg for item in self.dataset.items)

    def _micro_batches(self, start_micro: int) -> Iterator[tuple[int, list[int]]]:
        """(epoch, item indices) for every micro-batch from ``start_micro`` on, epochs repeating as needed."""
        micro = start_micro
        while True:
            epoch, index = divmod(micro, self.batches_per_epoch)
            batches = data.epoch_batches(self.dataset, self.global_batch, self.cfg.seed, epoch)
            for batch in batches[index:]:
                yield epoch, batch
                micro += 1

    def _loss(self, batch: list[int], seed: int) -> torch.Tensor:
        """The loss of this process's rows of the global ``batch`` (all of it on one process)."""
        cfg = self.cfg
        if cfg.lora_dropout:  # LoRA dropout draws from the global generators (seeding them formats stack
            torch.manual_seed(seed + 7919 * self.team.rank)  # traces for the lazy CUDA seed: ~0.1-0.5 ms)
        generator = torch.Generator(self.device).manual_seed(seed)
        rng = random.Random(seed)
        captions = [data.process_caption(self.dataset.items[i].caption, cfg, rng) for i in batch]
        share = self.team.share(batch, cfg.batch_size)
        indices = share.indices
        latents = self.latents.encode(indices)
        items = [self.dataset.items[i] for i in indices]
        cond = self.text.encode(captions[share.rows])
        if cond.pooled is not None:
            cond.size_ids = self.latents.size_ids(indices)
        weights = None
        if self.has_reg:
            weights = torch.tensor([cfg.prior_loss_weight if it.is_reg else 1.0 for it in items], device=self.device)
        masks = self.masks.batch(indices, tuple(latents.shape[-2:])) if self.masks else None
        loss = diffusion_loss(cfg, self.bundle, latents, cond, self.alphas, generator, weights, masks,
                              rows_of=(share.rows, share.total))
        return loss if share.weight == 1.0 else loss * share.weight

    def run(self) -> TrainResult:
        cfg, bundle = self.cfg, self.bundle
        if self.team.main:
            self.paths.check_writable()
            if cfg.tensorboard_dir:
                check_writable(cfg.tensorboard_dir, "logging_dir")
        if self.paths.name != (self.resume.output_name if self.resume else cfg.output_name):
            self.callbacks.on_log(f"{self.paths.name}: a run of that name already has files; nothing is replaced")
        flags = ModuleFlags.capture([bundle.unet, *bundle.text_encoders])
        file_weights = export.read_lora(cfg.network_weights)[0] if cfg.network_weights else None
        spec = cfg.network
        asked = (cfg.lora_rank, spec.file_alpha(cfg.lora_rank, cfg.lora_alpha))
        if asked[1] != cfg.lora_alpha:
            self.callbacks.on_log(f"lora_alpha: {spec.name} trains at scale 1 (alpha = rank = {cfg.lora_rank}); "
                                  f"lora_alpha {cfg.lora_alpha:g} does not apply and the file says {asked[1]:g}")
        rank, alpha = lora.network_dims(file_weights) if file_weights else asked
        if file_weights is not None and (rank, alpha) != asked:
            self.callbacks.on_log(f"network_weights: continuing with the file's rank {rank} and alpha {alpha}")
        self.dims = (rank, alpha)
        has_te_weights = bool(file_weights) and any(k.startswith("lora_te") for k in file_weights)
        # may refuse: nothing changed yet
        targets = bundle.lora_targets(cfg.train_text_encoder or has_te_weights, conv=spec.conv_dim > 0)
        network = None
        try:
            for module in (bundle.unet, *bundle.text_encoders):
                module.requires_grad_(False)
                module.eval()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(cfg.seed)
                network = lora.inject(targets, rank, alpha, cfg.lora_dropout, spec)
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
        groups = param_groups(cfg, network)
        facts = self.saver.facts = export.RunFacts(
            *self.dims, cfg.learning_rate, groups[0]["lr"], groups[1]["lr"] if cfg.train_text_encoder else None,
            self.saver.epochs_at(self.total_steps), self.batches_per_epoch, self.total_steps,
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
        team = self.team
        team.wrap(network.parameters(), self.device)
        writer = None  # made once there is something to log: a run stopped while caching leaves no log
        accumulation = cfg.gradient_accumulation_steps
        params = network.parameters()
        epoch, stopped, samples = 0, False, []
        running = torch.zeros((), device=self.device)
        window = 0
        try:
            if not self.latents.cache_all(self.callbacks.should_stop, self.callbacks.on_log, team):
                self.callbacks.on_log("stopped while caching latents; nothing was trained or written")
                return TrainResult(None, step, self.total_steps, True, history, facts=facts)
            self.text.fill([item.caption for item in self.dataset.items], team)
            if team.any(team.main and not self._prepare_validation()):  # validation runs on the main process
                return TrainResult(None, step, self.total_steps, True, history, facts=facts)
            writer = tensorboard_writer(cfg.tensorboard_dir, self.paths.name) if team.main else None
            self.callbacks.on_start(self.total_steps, step)
            batches = self.latents.prefetched(self._micro_batches(step * accumulation),
                                              lambda batch: team.share(batch, cfg.batch_size).indices)
            start_time, start_step = time.time(), step
            while step < self.total_steps:
                if team.any(self.callbacks.should_stop()):
                    stopped = True
                    break
                for micro in range(accumulation):
                    epoch, batch = next(batches)
                    with team.accumulating(sync=micro == accumulation - 1):
                        loss = team.forward(self._loss, batch, seed=cfg.seed * 1_000_003 + step * accumulation + micro)
                        scaler.scale(loss / accumulation).backward()
                    running += loss.detach() / accumulation
                optimizer_step(optimizer, scheduler, scaler, params, cfg.max_grad_norm)
                step += 1
                window += 1
                loss_value = None
                if window == cfg.log_every_n_steps or step == self.total_steps:
                    loss_value = team.mean(running).item() / window  # the only host-device sync in the loop
                    running.zero_()
                    window = 0
                    if not math.isfinite(loss_value):
                        raise NonFiniteError(f"the loss became {loss_value} by step {step}; "
                                             f"{self.saver.likely_cause()}. {self.saver.kept()}")
                    history.append(loss_value)
                self._report(step, epoch, loss_value, scheduler.get_last_lr()[0], start_time, start_step, writer)
                if team.main and self.validator and self.validator.due(step, self._epoch_ended(step)):
                    self._validate(step, writer)
                if team.main and step < self.total_steps and self._checkpoint_due(step):
                    path = self.saver.checkpoint(network, optimizer, scheduler, scaler, step, history)
                    self.callbacks.on_checkpoint(step, path)
                if team.main and cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
                    saved, images = sample(cfg, bundle, self.paths, step, self.sample_fn)
                    self.callbacks.on_sample(step, images)
                    samples += saved
        finally:
            if writer:
                writer.close()
            self.latents.close()
            if self.validator:
                self.validator.close()
            bundle.set_gradient_checkpointing(False)
            if cfg.torch_compile:
                del bundle.unet.forward  # back to the class's forward
            if channels_last:  # same values, the host's original memory layout
                bundle.unet.to(memory_format=torch.contiguous_format)
        if stopped:
            self.callbacks.on_log(f"stopped at step {step}/{self.total_steps}; saving what was trained")
        if step == 0 or not self.team.main:
            return TrainResult(None, step, self.total_steps, stopped, history, samples, facts)
        # state first: a finished run can be resumed to train longer, and it holds the weights if the export fails
        self.saver.save_state(network, optimizer, scheduler, scaler, step, history, finished=not stopped)
        output = self.saver.export_final(network, step)
        validation = self.validator.history.points if self.validator else []
        return TrainResult(output, step, self.total_steps, stopped, history, samples, facts, self.paths.state,
                           validation)

    def _epoch_ended(self, step: int) -> int | None:
        """The number of epochs done when ``step`` finished one, else None."""
        accumulation = self.cfg.gradient_accumulation_steps
        micro = step * accumulation
        epochs_done = micro // self.batches_per_epoch
        return epochs_done if epochs_done != (micro - accumulation) // self.batches_per_epoch else None

    def _checkpoint_due(self, step: int) -> bool:
        cfg = self.cfg
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
            return True
        epochs_done = self._epoch_ended(step)
        return bool(cfg.save_every_n_epochs) and epochs_done is not None and epochs_done % cfg.save_every_n_epochs == 0

    def _prepare_validation(self) -> bool:
        """Say which images are held out and cache their latents; False when a stop came in between."""
        if self.validator is None:
            if self.cfg.validation_split:
                self.callbacks.on_log(f"validation_split {self.cfg.validation_split:g} holds out no image of this "
                                      "dataset; raise it (each folder keeps at least one training image)")
            return True
        names = ", ".join(path.name for path in self.validator.images)
        self.callbacks.on_log(f"validation: {len(self.validator.images)} held-out image(s), never trained on: {names}")
        return self.validator.cache(self.callbacks.should_stop, self.callbacks.on_log)

    def _validate(self, step: int, writer) -> None:
        loss = self.validator.run(step)
        self.callbacks.on_validation(step, loss, self.validator.history.best[0])
        if writer:
            writer.add_scalar("loss/validation", loss, step)

    def _report(self, step, epoch, loss, lr, start_time, start_step, writer) -> None:
        elapsed = time.time() - start_time
        rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate else 0.0
        self.callbacks.on_step(StepInfo(step, self.total_steps, epoch, loss, lr, rate, eta))
        if writer and loss is not None:
            writer.add_scalar("loss/train", loss, step)
            writer.add_scalar("lr/unet", lr, step)



def train(cfg: TrainConfig, bundle: ModelBundle, callbacks: TrainCallbacks | None = None,
          sample_fn: SampleFn | None = None, final_dir: str | Path | None = None,
          dataset: data.Dataset | None = None, team: Team = SOLO) -> TrainResult:
    """Train a LoRA on ``bundle`` as ``cfg`` says.

    The final file goes to ``final_dir`` (default ``cfg.output_dir``); step files, resumable state and samples
    to ``cfg.output_dir``. Names are reserved for all of them together (run_paths.plan_run). ``dataset`` is
    ``preflight.check``'s scan of ``cfg``'s data when the caller just made it (else it is scanned here).
    ``team``: the processes of a run launched on several (torchrun, accelerate launch); one by default.
    """
    return Trainer(cfg, bundle, callbacks, sample_fn, final_dir, dataset, team).run()
