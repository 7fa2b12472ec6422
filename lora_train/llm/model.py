"""Causal LMs for LoRA: a local transformers folder or the built-in tiny model, and LoRA targets per architecture.

The tiny model is a 2-layer LLaMA built from the config shipped beside this file with a fixed seed, and its
tokenizer is byte-level (token id = byte value, EOS = 256), so neither needs a download or a stored weight.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import transformers
from torch import nn

from lora_train.engine.config.settings import ConfigError
from lora_train.engine.devices import frozen_dtype
from lora_train.hosts.clip_tokenizer import _byte_symbols
from lora_train.llm.config import TINY_MODEL

TINY_FOLDER = Path(__file__).resolve().parent / "tiny-llm"
EOS = "<|endoftext|>"
_TINY_SEED = 0  # the tiny base must be the same model in every run and in `generate`
_DTYPE_KEY = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def save_kwargs(save) -> dict:
    """transformers 4.x writes pickles unless asked for safetensors; 5.x always writes safetensors."""
    return {"safe_serialization": True} if "safe_serialization" in inspect.signature(save).parameters else {}


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer with token id == byte value and EOS (also BOS and padding) as id 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = _byte_symbols()  # GPT-2's printable stand-in for each byte, printable bytes first
    printable = {ord(s) for s in symbols if ord(s) < 256}
    others = [b for b in range(256) if b not in printable]
    by_byte = sorted(symbols, key=lambda s: ord(s) if ord(s) < 256 else others[ord(s) - 256])
    tokenizer = Tokenizer(models.BPE({s: i for i, s in enumerate(by_byte)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])  # id 256, matched whole in text
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS,
                                                pad_token=EOS, model_max_length=512,
                                                model_input_names=["input_ids", "attention_mask"])


def _build_tiny() -> nn.Module:
    config = transformers.AutoConfig.from_pretrained(str(TINY_FOLDER), local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.name_or_path = model.config.name_or_path = TINY_MODEL  # the base an adapter_config.json names
    return model


def _quantization(bits: int | None, device: torch.device, dtype: torch.dtype):
    if bits is None:
        return None
    key = f"load_in_{bits}bit"
    if device.type != "cuda":
        raise ConfigError(key, "a 4-/8-bit base (bitsandbytes) needs a CUDA GPU; remove it to train in full precision")
    return transformers.BitsAndBytesConfig(**{key: True}, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=dtype)


def load(base_model: str, device: torch.device, precision: str = "no", bits: int | None = None):
    """(model, tokenizer) for ``base_model``: ``tiny-llm`` or a local folder (config.json, weights, tokenizer)."""
    dtype = frozen_dtype(precision, device)
    quantization = _quantization(bits, device, dtype)
    if base_model == TINY_MODEL:
        if quantization is not None:
            raise ConfigError(f"load_in_{bits}bit", "the built-in tiny model is not quantized; use a model folder")
        return _build_tiny().to(device, dtype), byte_tokenizer()
    folder = Path(base_model)
    if not (folder / "config.json").is_file():
        raise ConfigError("base_model", f"{base_model!r} is not a transformers model folder (config.json, weights, "
                          f"tokenizer files); download the model first, or use {TINY_MODEL}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    placement = {"device_map": {"": device.index or 0}} if quantization is not None else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, quantization_config=quantization, **{_DTYPE_KEY: dtype}, **placement)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (model if quantization is not None else model.to(device)), tokenizer


def _linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the layers LoRA can wrap (nn.Linear; GPT-2's Conv1D)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"})


def lora_targets(model: nn.Module, requested: list[str]) -> list[str]:
    """``requested`` if each names a layer of ``model``; else peft's default for the architecture (q/v
    projections; ``c_attn`` on GPT-2)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    names = [name for name, _ in model.named_modules()]
    model_type = getattr(model.config, "model_type", "unknown")
    hint = ", ".join(_linear_names(model))
    if requested:
        missing = [t for t in requested if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            raise ConfigError("target_modules", f"{missing} match no layer of this {model_type} model; its layers: "
                              f"{hint}")
        return list(requested)
    targets = DEFAULTS.get(model_type)
    if targets is None and {"q_proj", "v_proj"} <= {n.rsplit(".", 1)[-1] for n in names}:
        targets = ["q_proj", "v_proj"]
    if not targets:
        raise ConfigError("target_modules", f"no default LoRA layers for model type {model_type!r}; list some of: "
                          f"{hint}")
    return list(targets)
