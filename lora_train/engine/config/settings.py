"""Typed training config with the key names lora-scripts and kohya users know; YAML in and out.

Validation happens before any work starts: an unknown key or a bad value raises one ``ConfigError``
that names the key, the value and, for a typo, the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lora_train.engine.config.checks import ConfigError, parse_resolution, validate
from lora_train.engine.config.fields import FieldInfo, describe, setting
from lora_train.engine.config.network_spec import NetworkSpec, spec_of
from lora_train.engine.config.paths import prompts_file
from lora_train.engine.data import caption_store

NetworkModule = Literal["networks.lora", "lycoris.kohya"]
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "sgd"]
Scheduler = Literal[
    "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"
]
Precision = Literal["no", "fp16", "bf16"]
SavePrecision = Literal["fp16", "bf16", "float"]
LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]


def tensorboard_folder(logging_dir: str | None, output_dir: str) -> Path | None:
    """Where TensorBoard logs go: ``logging_dir``; unset, ``output_dir/logs`` when tensorboard is installed
    (what lora-scripts users expect); ``""`` turns logging off."""
    if logging_dir:
        return Path(logging_dir)
    if logging_dir is None and importlib.util.find_spec("tensorboard") is not None:
        return Path(output_dir) / "logs"
    return None


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are sane for a first character LoRA on SD1.5."""

    train_data_dir: str = setting(
        "", group="Data", label="Dataset folder", unset="(required)",
        help="Image folder; images in it count once, kohya's `N_name` subfolders N times (repeats).")
    metadata_path: str | None = setting(
        None, group="Data", label="Captions CSV", unset="none (`.txt` sidecars)",
        help="CSV with `filename,prompt` rows instead of `.txt` sidecar captions.")
    caption_extension: str = setting(
        ".txt", group="Data", label="Caption file extension", help="Extension of the sidecar caption files.")
    reg_data_dir: str | None = setting(
        None, group="Data", label="Regularization images",
        help="Regularization image folder (same folder rules; captions optional).")
    prior_loss_weight: float = setting(
        1.0, group="Data", label="Regularization loss weight", help="Loss weight of the regularization images.")
    trigger_word: str | None = setting(
        None, group="Data", label="Trigger word",
        help="Put first in every caption (kept first when shuffling) and written to the sidecar card.")
    resolution: str = setting(
        "512", group="Data", label="Resolution",
        help="Training area: `512`, or `width,height`; sides multiples of 8. 512 for SD1, 768 SD2, 1024 SDXL.")
    enable_bucket: bool = setting(
        True, group="Data", label="Aspect-ratio buckets",
        help="Group images by aspect ratio instead of centre-cropping everything square.")
    min_bucket_reso: int = setting(
        256, group="Data", label="Smallest bucket side", help="Smallest bucket width or height, in pixels.")
    max_bucket_reso: int = setting(
        1024, group="Data", label="Largest bucket side", help="Largest bucket width or height, in pixels.")
    bucket_reso_steps: int = setting(
        64, group="Data", label="Bucket side step", help="Bucket sides are multiples of this (pixels).")
    shuffle_caption: bool = setting(
        False, group="Data", label="Shuffle caption tags", help="Shuffle comma-separated tags every step.")
    keep_tokens: int = setting(
        0, group="Data", label="Tags kept in place",
        help="Leading tags never shuffled (the trigger word always stays first).")
    caption_dropout_rate: float = setting(
        0.0, group="Data", label="Caption dropout",
        help="Probability (0-1) of training a step with an empty caption.")
    max_token_length: int = setting(
        75, group="Data", label="Caption length (tokens)",
        help="75, 150 or 225: captions are read in the WebUI's 75-token chunks (each with its own start and end "
             "token, as generation encodes a long prompt), up to this many tokens; the rest is cut off.")
    weighted_captions: bool = setting(
        False, group="Data", label="Weighted captions",
        help="Apply the WebUI's emphasis in captions (`(word:1.2)`, `(word)`, `[word]`) as weights on the text "
             "features, as kohya's weighted_captions and the WebUI's \"Original\" emphasis do. Off, emphasis is "
             "stripped to its text. Escaped brackets (`\\(`) are always read as literal brackets.")
    cache_latents: bool = setting(
        True, group="Data", label="Cache latents",
        help="Encode every image once with the VAE (faster steps; no random crops).")
    cache_latents_to_disk: bool = setting(
        False, group="Data", label="Cache latents to disk",
        help="Also keep the encoded latents in `output_dir/.latent_cache` for the next run.")
    base_model: str = setting(
        "tiny", group="Model and network", label="Base model", scope="standalone",
        help="Checkpoint file (.safetensors/.ckpt), diffusers folder, `tiny` or `tiny-sdxl`. The WebUI trains "
             "the checkpoint it has loaded.")
    v_parameterization: bool | None = setting(
        None, group="Model and network", label="v-prediction", unset="auto (from the model's config)",
        help="v-prediction loss (SD2 768-v, v-pred SDXL). Auto: the WebUI's loaded model's parameterization; in "
             "the CLI a `.yaml` beside the checkpoint, its `v_pred` key, or a diffusers folder's scheduler.")
    zero_terminal_snr: bool | None = setting(
        None, group="Model and network", label="Zero terminal SNR",
        unset="the WebUI's \"Noise schedule for sampling\" (or a checkpoint's `ztsnr` key); off in the CLI",
        help="Train on the noise schedule rescaled to zero terminal SNR (Lin et al. 2023), as the WebUI samples "
             "with \"Zero Terminal SNR\"; for v-prediction models trained that way (NoobAI v-pred).")
    scale_v_pred_loss_like_noise_pred: bool = setting(
        False, group="Optimisation", label="Scale v-pred loss like noise-pred",
        help="kohya's option for v-prediction: weight each step's loss by SNR/(SNR+1), as an epsilon loss weighs it.")
    v_pred_like_loss: float | None = setting(
        None, group="Optimisation", label="v-pred-like loss", unset="none (off)",
        help="kohya's option: add this share of a v-prediction-like loss (loss x (SNR+1)/SNR) to an epsilon "
             "model's loss; 0.1 is a usual value.")
    clip_skip: int | None = setting(
        None, group="Model and network", label="CLIP skip",
        unset="the WebUI's own Clip skip setting (what it generates with); 1 in the CLI",
        help="Which CLIP layer conditions the UNet, 1-12 as in the WebUI: 1 the last, 2 the penultimate (SD1 anime "
             "models). SD2's and SDXL's OpenCLIP ignore it as the WebUI does; SDXL's CLIP-L follows it when the "
             "WebUI's \"Clip skip SDXL\" is on. Written to the LoRA as `ss_clip_skip`.")
    lora_rank: int = setting(
        8, group="Model and network", label="Rank (network_dim)",
        help="LoRA dimension: capacity and file size. 8-32 is usual (characters 16, styles 32).")
    lora_alpha: float = setting(
        16.0, group="Model and network", label="Alpha (network_alpha)",
        help="The update is scaled by alpha / rank. The default 16 at rank 8 (scale 2) learns fast at 1e-4 on "
             "short runs; the presets use alpha = rank/2 or = rank (scale 0.5-1), gentler for long runs. "
             "LoKr ignores it (scale 1, as peft 0.13.2 trains it).")
    lora_dropout: float = setting(
        0.0, group="Model and network", label="LoRA dropout", help="Dropout inside the LoRA layers, in [0, 1).")
    train_text_encoder: bool = setting(
        False, group="Model and network", label="Train the text encoder",
        help="Also train LoRA on the text encoder(s); helps characters on SD1.")
    network_module: NetworkModule = setting(
        "networks.lora", group="Model and network", label="Network type (network_module)",
        help="`networks.lora`: kohya's LoRA (LoCon with `conv_dim`). `lycoris.kohya`: LyCORIS, whose "
             "`network_args` pick `algo=locon`, `loha` or `lokr`. Every WebUI applies all of them.")
    network_args: list[str] = setting(
        group="Model and network", label="Network arguments", default_factory=list,
        help="kohya-style `key=value` items: `algo=loha|lokr|locon`, `conv_dim=8`, `conv_alpha=4`, `factor=8` "
             "(LoKr), `dora_wd=True` (DoRA).")
    conv_dim: int = setting(
        0, group="Model and network", label="Conv rank (conv_dim)",
        help="Rank on the UNet's 3x3 convolutions (ResNet blocks, down/upsamplers): LoCon, for styles. "
             "0: transformer layers only.")
    conv_alpha: float = setting(
        1.0, group="Model and network", label="Conv alpha (conv_alpha)",
        help="Alpha of the 3x3 convolutions' layers (scale conv_alpha / conv_dim). LoKr trains them at scale 1 "
             "(alpha = conv_dim, what its file and metadata say) and refuses another conv_alpha.")
    network_weights: str | None = setting(
        None, group="Model and network", label="Start from a LoRA",
        help="An existing kohya LoRA file to continue from (its rank and alpha are kept).")
    batch_size: int = setting(1, group="Optimisation", label="Batch size", help="Images per step.")
    gradient_accumulation_steps: int = setting(
        1, group="Optimisation", label="Gradient accumulation", help="Micro-batches per optimizer step.")
    epochs: int = setting(
        10, group="Optimisation", label="Epochs", help="Passes over the dataset (with repeats).")
    max_train_steps: int | None = setting(
        None, group="Optimisation", label="Max steps", unset="none (from `epochs`)",
        help="Optimizer steps to train; overrides `epochs`.")
    learning_rate: float = setting(
        1e-4, group="Optimisation", label="Learning rate", help="Base learning rate; 1e-4 is typical for AdamW.")
    unet_lr: float | None = setting(
        None, group="Optimisation", label="UNet learning rate", unset="learning_rate",
        help="Learning rate of the UNet's LoRA.")
    text_encoder_lr: float | None = setting(
        None, group="Optimisation", label="Text encoder learning rate", unset="learning_rate",
        help="Learning rate of the text encoder's LoRA; often half the UNet's.")
    loraplus_lr_ratio: float | None = setting(
        None, group="Optimisation", label="LoRA+ ratio", unset="off",
        help="LoRA+: the up matrices (lora_up; LoHa/LoKr's output-side factors) learn this many times faster; "
             "16 is the paper's value.")
    loraplus_unet_lr_ratio: float | None = setting(
        None, group="Optimisation", label="LoRA+ ratio (UNet)", unset="loraplus_lr_ratio",
        help="LoRA+ ratio for the UNet only.")
    loraplus_text_encoder_lr_ratio: float | None = setting(
        None, group="Optimisation", label="LoRA+ ratio (text encoder)", unset="loraplus_lr_ratio",
        help="LoRA+ ratio for the text encoder only.")
    optimizer: Optimizer = setting(
        "adamw", group="Optimisation", label="Optimizer",
        help="`adamw8bit` needs bitsandbytes, `prodigy` prodigyopt (use learning_rate 1).")
    optimizer_args: dict[str, Any] = setting(
        group="Optimisation", label="Optimizer arguments", default_factory=dict,
        help="Extra optimizer arguments as a YAML mapping, e.g. `{weight_decay: 0.01}`.")
    lr_scheduler: Scheduler = setting(
        "constant", group="Optimisation", label="LR schedule", help="How the learning rate changes over the run.")
    lr_warmup_steps: int = setting(
        0, group="Optimisation", label="Warmup steps", help="Steps ramping the learning rate up from 0.")
    lr_scheduler_num_cycles: int = setting(
        1, group="Optimisation", label="Schedule restarts", help="Restarts of `cosine_with_restarts`.")
    lr_scheduler_power: float = setting(
        1.0, group="Optimisation", label="Schedule power", help="Power of the `polynomial` schedule.")
    max_grad_norm: float = setting(
        1.0, group="Optimisation", label="Gradient clipping", help="Clip gradients to this norm (0 = off).")
    mixed_precision: Precision = setting(
        "no", group="Optimisation", label="Mixed precision",
        help="Autocast; base weights in half precision on a GPU. bf16 on recent GPUs, fp16 otherwise.")
    gradient_checkpointing: bool = setting(
        False, group="Optimisation", label="Gradient checkpointing", help="Less memory, about 20 % slower.")
    channels_last: bool = setting(
        False, group="Optimisation", label="Channels-last layout",
        help="Channels-last UNet memory layout for the run (faster convolutions on recent GPUs).")
    torch_compile: bool = setting(
        False, group="Optimisation", label="torch.compile",
        help="Compile the UNet for the run (slow first steps, faster after).")
    noise_offset: float = setting(
        0.0, group="Noise and loss", label="Noise offset",
        help="Offset noise for darker darks and brighter brights; 0.05-0.1 when wanted.")
    noise_offset_random_strength: bool = setting(
        False, group="Noise and loss", label="Random noise offset strength",
        help="Each step draws the offset's strength between 0 and noise_offset instead of always the full value: "
             "a gentler noise offset.")
    adaptive_noise_scale: float | None = setting(
        None, group="Noise and loss", label="Adaptive noise scale", unset="none (off)",
        help="Adds this times each image's absolute latent mean (per channel) to noise_offset; needs noise_offset. "
             "For datasets of very bright or very dark images; about noise_offset / 10.")
    multires_noise_iterations: int | None = setting(
        None, group="Noise and loss", label="Multires noise levels", unset="none (off)",
        help="Multi-resolution (pyramid) noise with this many levels; 6-10 is usual, 0 is off. Like noise offset, "
             "it teaches large dark or bright areas and strong contrast.")
    multires_noise_discount: float = setting(
        0.3, group="Noise and loss", label="Multires noise discount",
        help="Level i of the multires noise is scaled by discount^i (0-1): higher gives more low-frequency noise; "
             "0.3 (kohya's default) to 0.8.")
    ip_noise_gamma: float | None = setting(
        None, group="Noise and loss", label="Input perturbation noise", unset="none (off)",
        help="Input-perturbation noise (Ning et al. 2023): the UNet's input gets extra noise of this strength that "
             "its target lacks; about 0.1 against overfitting a small dataset.")
    ip_noise_gamma_random_strength: bool = setting(
        False, group="Noise and loss", label="Random input perturbation strength",
        help="Each step draws the input-perturbation strength between 0 and ip_noise_gamma.")
    min_timestep: int | None = setting(
        None, group="Noise and loss", label="Min timestep", unset="0",
        help="Train only timesteps from this one up (0-999). Raise it to train composition and shapes, not detail.")
    max_timestep: int | None = setting(
        None, group="Noise and loss", label="Max timestep", unset="1000",
        help="Train only timesteps below this one (1-1000). Lower it (e.g. 500) to train detail and texture, not "
             "composition.")
    loss_type: LossType = setting(
        "l2", group="Noise and loss", label="Loss type",
        help="`l2` (mean squared error) is the usual loss. `huber` and `smooth_l1` (scheduled pseudo-Huber, "
             "Khrapov et al. 2024) are robust to outliers: noisy, odd or badly captioned images. `l1`: absolute "
             "error.")
    huber_schedule: HuberSchedule = setting(
        "snr", group="Noise and loss", label="Huber schedule",
        help="How huber_c changes with the timestep for `huber`/`smooth_l1`: `snr` (kohya's default: near l2 at "
             "noisy steps, robust at clean ones), `exponential` (from 1 at t=0 to huber_c at t=1000), `constant`.")
    huber_c: float = setting(
        0.1, group="Noise and loss", label="Huber c",
        help="Huber threshold: errors below it count squared, above it linearly. Larger is closer to l2; 0.1 is "
             "kohya's default.")
    huber_scale: float = setting(
        1.0, group="Noise and loss", label="Huber scale",
        help="Multiplies the threshold of the `constant` and `exponential` Huber schedules (kohya's huber_scale).")
    min_snr_gamma: float | None = setting(
        None, group="Noise and loss", label="Min-SNR gamma", unset="none (off)",
        help="Min-SNR loss weighting; 5 is typical.")
    debiased_estimation_loss: bool = setting(
        False, group="Noise and loss", label="Debiased estimation loss",
        help="Weights each step's loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)) so no timestep dominates "
             "(Yu et al. 2024); an alternative to min_snr_gamma, often with fewer artefacts.")
    masked_loss: bool = setting(
        False, group="Noise and loss", label="Masked loss",
        help="Train only where the mask is: white in conditioning_data_dir's mask images, or opaque with "
             "alpha_mask. For a subject on a background it should not learn.")
    alpha_mask: bool = setting(
        False, group="Noise and loss", label="Alpha channel as mask",
        help="Use each image's alpha channel as the loss mask: transparent pixels are not trained (images without "
             "alpha train everywhere). Turns masked loss on.")
    conditioning_data_dir: str | None = setting(
        None, group="Noise and loss", label="Mask images folder", unset="none",
        help="Mask images for masked_loss, named like the training images (any image type, same size, "
             "`N_name` subfolders as in train_data_dir or all in one folder); white trains, black is ignored.")
    seed: int = setting(42, group="Optimisation", label="Seed", help="Makes runs repeatable and resumable.")
    device: str = setting(
        "auto", group="Optimisation", label="Device", scope="standalone",
        help="`auto`, `cuda`, `cpu`, `cuda:1`, ... The WebUI trains on its own device.")
    multi_gpu: bool = setting(
        False, group="Optimisation", label="Multi-GPU", scope="cli",
        help="Train on several GPUs at once: `lora-train train` starts one process per GPU itself (README, More "
             "than one GPU). The global batch is batch_size x GPUs; learning_rate is not scaled. The tab trains "
             "on one GPU.")
    gpu_ids: list[str] = setting(
        group="Optimisation", label="GPU ids", scope="cli", default_factory=list, unset="every GPU",
        help="With `multi_gpu`: the GPUs to use, e.g. `[0, 1]` (lora-scripts' spelling; one process each).")
    output_dir: str = setting(
        "output", group="Output", label="Output folder", scope="cli",
        help="Where the LoRA, checkpoints, state and samples go. The tab sets it: the LoRA goes to the Lora "
             "folder, the run's files to the run folder.")
    output_name: str = setting(
        "lora", group="Output", label="LoRA name", help="File name without extension.")
    overwrite: bool = setting(
        False, group="Output", label="Overwrite", scope="cli",
        help="Replace an existing output instead of writing `<name>-2`. The tab never overwrites.")
    save_precision: SavePrecision = setting(
        "fp16", group="Output", label="Save precision", help="Precision of the saved LoRA weights.")
    save_every_n_steps: int = setting(
        0, group="Output", label="Save every N steps", help="Intermediate LoRA files and resumable state (0 = off).")
    save_every_n_epochs: int = setting(
        0, group="Output", label="Save every N epochs", help="As above, per epoch (0 = off).")
    resume: str | None = setting(
        None, group="Output", label="Resume from", help="A `<name>-state` folder to continue.")
    logging_dir: str | None = setting(
        None, group="Output", label="TensorBoard folder", unset="`output_dir/logs` when tensorboard is installed",
        help="TensorBoard scalars (loss, lr); `\"\"` turns them off.")
    log_every_n_steps: int = setting(
        10, group="Output", label="Read loss every N steps",
        help="How often the loss is read back (reading it syncs the GPU).")
    sample_prompts: list[str] = setting(
        group="Samples", label="Sample prompts", default_factory=list,
        help="Prompts for preview images, one per line, or a `.txt` file with one prompt per line.")
    sample_every_n_steps: int = setting(
        0, group="Samples", label="Sample every N steps", help="Preview interval (0 = off).")
    sample_steps: int = setting(20, group="Samples", label="Sampler steps", help="Steps per preview image.")
    sample_cfg_scale: float = setting(7.0, group="Samples", label="CFG scale", help="Guidance of the previews.")
    validation_split: float = setting(
        0.0, group="Validation", label="Validation split",
        help="Fraction of each image folder held out (never trained on) for a validation loss, e.g. 0.1; "
             "0 = no validation.")
    validation_seed: int | None = setting(
        None, group="Validation", label="Validation seed", unset="seed",
        help="Picks which images are held out and the fixed noise they are validated with.")
    validate_every_n_steps: int | None = setting(
        None, group="Validation", label="Validate every N steps", unset="off",
        help="Also validate every N optimizer steps.")
    validate_every_n_epochs: int | None = setting(
        None, group="Validation", label="Validate every N epochs", unset="every epoch",
        help="Validate at the end of every N-th epoch (when validation_split is set).")
    max_validation_steps: int | None = setting(
        None, group="Validation", label="Max validation batches", unset="all held-out images",
        help="Validate on at most this many batches of held-out images (faster, noisier).")
    training_comment: str | None = setting(
        None, group="Output", label="Training comment", help="Stored in the LoRA as `ss_training_comment`.")

    def __post_init__(self) -> None:
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension  # kohya writes both "txt" and ".txt"
        validate(vars(self))
        spec_of(vars(self))  # a network that cannot be built is refused with the config, not at the first step

    @property
    def resolution_hw(self) -> tuple[int, int]:
        """``resolution`` as (height, width); kohya writes "512" or "512,768" (width,height)."""
        return parse_resolution(self.resolution)

    @property
    def network(self) -> NetworkSpec:
        """The network to train, from network_module, network_args and conv_dim/conv_alpha."""
        return spec_of(vars(self))

    @property
    def tensorboard_dir(self) -> Path | None:
        """See ``tensorboard_folder``."""
        return tensorboard_folder(self.logging_dir, self.output_dir)

    @property
    def prompts(self) -> list[str]:
        """``sample_prompts`` as a list, or read one per line from a .txt file (kohya's form)."""
        file = prompts_file(self.sample_prompts)
        if file is None:
            return list(self.sample_prompts)
        path = Path(file)
        if not path.is_file():
            raise ConfigError("sample_prompts", f"file {path} not found; give a .txt with one prompt per line")
        try:
            lines = caption_store.read_text(path).splitlines()
        except caption_store.CaptionFileError as exc:
            raise ConfigError("sample_prompts", str(exc)) from None
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_infos() -> list[FieldInfo]:
    """Every TrainConfig key with its help, group, label, scope and aliases (README table, tab, API schema)."""
    return describe(TrainConfig)
