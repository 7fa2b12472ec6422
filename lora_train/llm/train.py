"""The text-generation LoRA loop: load, add LoRA, loop, save. The SD trainer's shape on a causal LM.

Batches come from (seed, epoch) and dropout from (seed, micro-batch), so a run resumed from a checkpoint ends
bit-identical to one that never stopped (on the CPU). Progress goes through the SD engine's TrainCallbacks, so
the CLI's tqdm bar and Ctrl-C handling drive this loop too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from lora_train.engine.config.settings import ConfigError
from lora_train.engine.devices import pick_device
from lora_train.engine.files import free_name
from lora_train.engine.train.loss import autocast
from lora_train.engine.train.optim import make_grad_scaler, make_optimizer, make_scheduler, optimizer_step
from lora_train.engine.train.progress import StepInfo, TrainCallbacks, TrainResult
from lora_train.engine.train.samples import tensorboard_writer
from lora_train.hosts.hf_compat import set_checkpointing
from lora_train.llm import checkpoint, data
from lora_train.llm import model as models
from lora_train.llm.config import LlmConfig
from lora_train.llm.generate import generate


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def collate(samples: list[data.Sample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (IGNORE on padding)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), data.IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample.input_ids)
        ids[row, :length] = torch.tensor(sample.input_ids)
        labels[row, :length] = torch.tensor(sample.labels)
        mask[row, :length] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class _Paths:
    """Where a run writes; a resumed run keeps the name of the run it continues."""

    def __init__(self, cfg: LlmConfig, resumed: str | None):
        self.dir = Path(cfg.output_dir)
        name = resumed or cfg.output_name
        if not (resumed or cfg.overwrite):
            name = free_name(self.dir, name, ("", "-merged"))
        self.name = name
        self.adapter = self.dir / name
        self.merged = self.dir / f"{name}-merged"

    def step(self, step: int) -> Path:
        return self.dir / f"{self.name}-step{step:08d}"


class LlmTrainer:
    """One LoRA run on a causal LM. ``model`` keeps the trained adapter after ``run()`` (tests compare it)."""

    def __init__(self, cfg: LlmConfig, callbacks: TrainCallbacks | None = None, loaded: tuple | None = None):
        self.callbacks = callbacks or TrainCallbacks()
        self.device = pick_device(cfg.device)
        if self.device.type == "cpu" and cfg.mixed_precision != "no":
            self.callbacks.on_log(f"{cfg.mixed_precision} needs a GPU; training in float32 on the CPU")
            cfg = dataclasses.replace(cfg, mixed_precision="no")
        bits = 4 if cfg.load_in_4bit else 8 if cfg.load_in_8bit else None
        self.model, self.tokenizer = loaded or models.load(cfg.base_model, self.device, cfg.mixed_precision, bits)
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if positions and cfg.max_seq_length > positions:
            raise ConfigError("max_seq_length", f"{cfg.max_seq_length} is more than this model's {positions} "
                              "positions; lower it")
        self.samples, dropped = data.load_samples(cfg.train_data_dir, self.tokenizer, cfg.max_seq_length, cfg.packing)
        if dropped:
            self.callbacks.on_log(f"{dropped} sample(s) keep no response token within max_seq_length "
                                  f"{cfg.max_seq_length}; skipped")
        self.batches_per_epoch = math.ceil(len(self.samples) / cfg.batch_size)
        micro_total = cfg.epochs * self.batches_per_epoch
        self.total_steps = cfg.max_train_steps or math.ceil(micro_total / cfg.gradient_accumulation_steps)
        if cfg.warmup_ratio:  # HF-Trainer: warmup steps = ceil(ratio * total steps)
            warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
            cfg = dataclasses.replace(cfg, lr_warmup_steps=warmup, warmup_ratio=0.0)
        self.cfg = cfg
        self.resume_info = checkpoint.read_info(cfg.resume) if cfg.resume else {}
        self.paths = _Paths(cfg, self.resume_info.get("output_name"))
        self.writer = None  # TensorBoard, opened when the steps start
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # -- model --------------------------------------------------------------------------------------
    def _add_lora(self):
        from peft import LoraConfig, PeftModel, get_peft_model

        cfg, model = self.cfg, self.model
        if cfg.gradient_checkpointing:
            set_checkpointing(model, True)
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
            model.config.use_cache = False
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        if cfg.network_weights:
            folder = Path(cfg.network_weights)
            if not (folder / "adapter_config.json").is_file():
                raise ConfigError("network_weights", f"{folder} is not a peft adapter folder (adapter_config.json "
                                  f"+ {checkpoint.ADAPTER_WEIGHTS})")
            peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
            adapter = peft_model.peft_config["default"]
            self.callbacks.on_log(f"network_weights: continuing {folder} (rank {adapter.r}, alpha "
                                  f"{adapter.lora_alpha}, layers {sorted(adapter.target_modules)})")
            return peft_model
        targets = models.lora_targets(model, cfg.target_modules)
        lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=targets)
        return get_peft_model(model, lora)

    # -- saving -------------------------------------------------------------------------------------
    def _checkpoint(self, model, objects: dict, step: int, history: list[float]) -> Path:
        info = {"step": step, "output_name": self.paths.name, "loss_history": history}
        path = checkpoint.save(self.paths.step(step), model, objects, info)
        self.callbacks.on_checkpoint(step, path)
        return path

    def merge(self, model) -> Path:
        """Fold the adapter into the base weights and write a standalone model folder (``--merge``)."""
        merged = model.merge_and_unload()

        def fill(tmp: Path) -> None:
            merged.save_pretrained(str(tmp), **models.save_kwargs(merged.save_pretrained))
            self.tokenizer.save_pretrained(str(tmp))

        path = checkpoint.write_folder(self.paths.merged, fill)
        self.callbacks.on_log(f"merged model: {path}")
        return path

    def _samples(self, model, when: str) -> None:
        """Greedy answers to ``sample_prompts``, logged before and after training."""
        model.eval()
        for prompt in self.cfg.sample_prompts:
            self.callbacks.on_log(f"sample ({when}): {prompt!r} -> {generate(model, self.tokenizer, prompt)!r}")
        model.train()

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            model = self._add_lora()
            self.model = model
            return self._loop(model)

    def _batches(self, micro: int):
        """(epoch, samples) for every micro-batch from ``micro`` on, epochs repeating as needed."""
        size = self.cfg.batch_size
        while True:
            epoch, index = divmod(micro, self.batches_per_epoch)
            order = epoch_order(len(self.samples), self.cfg.seed, epoch)
            yield epoch, [self.samples[i] for i in order[index * size : (index + 1) * size]]
            micro += 1

    def _loop(self, model) -> TrainResult:
        cfg, device = self.cfg, self.device
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, [{"params": params, "lr": cfg.learning_rate}])
        scheduler = make_scheduler(cfg, optimizer, self.total_steps)
        scaler = make_grad_scaler(device, cfg.mixed_precision == "fp16")
        objects = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        step, history = 0, []
        if cfg.resume:
            checkpoint.restore(cfg.resume, model, objects, device)
            step, history = int(self.resume_info["step"]), list(self.resume_info.get("loss_history", []))
            self.callbacks.on_log(f"resumed from {cfg.resume} at step {step}")
        layers = sorted(model.peft_config["default"].target_modules)
        self.callbacks.on_log(f"{len(self.samples)} samples, {self.batches_per_epoch} batches per epoch, "
                              f"{self.total_steps} steps; LoRA on {layers}")
        self._samples(model, "before")
        accumulation = cfg.gradient_accumulation_steps
        batches = self._batches(step * accumulation)
        self.callbacks.on_start(self.total_steps, step)
        self.writer = tensorboard_writer(cfg.tensorboard_dir, self.paths.name)
        start_time, start_step, epoch, stopped = time.time(), step, 0, False
        running, window = torch.zeros((), device=device), 0
        model.train()
        try:
            while step < self.total_steps:
                if self.callbacks.should_stop():
                    stopped = True
                    break
                for micro in range(accumulation):
                    epoch, batch = next(batches)
                    torch.manual_seed(cfg.seed * 1_000_003 + step * accumulation + micro)  # LoRA dropout
                    with autocast(cfg, device):
                        loss = model(**collate(batch, self.pad_id, device)).loss
                    scaler.scale(loss / accumulation).backward()
                    running += loss.detach().float() / accumulation
                optimizer_step(optimizer, scheduler, scaler, params, cfg.max_grad_norm)
                step, window = step + 1, window + 1
                if window == cfg.log_every_n_steps or step == self.total_steps:
                    history.append(running.item() / window)  # the only host-device sync in the loop
                    running.zero_()
                    window = 0
                    self._report(step, epoch, history[-1], scheduler.get_last_lr()[0], start_time, start_step)
                if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < self.total_steps:
                    self._checkpoint(model, objects, step, history)
            if stopped:
                path = self._checkpoint(model, objects, step, history)
                self.callbacks.on_log(f"stopped at step {step}/{self.total_steps}; continue with --set resume={path}")
        finally:
            if self.writer:
                self.writer.close()
        self._samples(model, "after")
        output = checkpoint.save_adapter(self.paths.adapter, model)
        return TrainResult(output, step, self.total_steps, stopped, history)

    def _report(self, step: int, epoch: int, loss: float, lr: float, start_time: float, start_step: int) -> None:
        elapsed = time.time() - start_time
        rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate else 0.0
        self.callbacks.on_step(StepInfo(step, self.total_steps, epoch, loss, lr, rate, eta))
        if self.writer:
            self.writer.add_scalar("loss/train", loss, step)
            self.writer.add_scalar("lr", lr, step)


def train(cfg: LlmConfig, callbacks: TrainCallbacks | None = None, loaded: tuple | None = None,
          merge: bool = False) -> TrainResult:
    """Train a LoRA on ``cfg.base_model`` (or ``loaded`` = (model, tokenizer)) and write the adapter folder."""
    if merge and (cfg.load_in_4bit or cfg.load_in_8bit):
        raise ConfigError("--merge", "a 4-/8-bit base cannot take the adapter without loss; train without --merge, "
                          "then merge on the base loaded in 16 bit (PeftModel.from_pretrained(...).merge_and_unload())")
    trainer = LlmTrainer(cfg, callbacks, loaded)
    result = trainer.run()
    if merge and result.output is not None:
        trainer.merge(trainer.model)
    return result
