"""``python -m lora_train generate``: try an adapter (or a merged model) on a prompt.

The prompt is rendered the way training rendered prompts (chat template, else the prompt and a newline), so
the model continues where it learned to answer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lora_train.engine.config.settings import ConfigError
from lora_train.engine.devices import pick_device
from lora_train.llm import data
from lora_train.llm import model as models


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0, seed: int = 0,
             raw: bool = False) -> str:
    """The model's continuation of ``prompt`` (greedy unless ``temperature`` > 0), special tokens removed."""
    text = prompt if raw else data.prompt_text(prompt, tokenizer)
    special = not data.has_chat_template(tokenizer)
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=special)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(input_ids=encoded["input_ids"].to(device),
                                attention_mask=encoded["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def adapter_base(adapter: str) -> str | None:
    """The base model an adapter folder records (``base_model_name_or_path`` in adapter_config.json)."""
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError("--adapter", f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path") or None


def load_for_generation(model_path: str | None, adapter: str | None, device: str = "auto"):
    """(model, tokenizer) in eval mode: ``model_path`` (default: the adapter's base) with ``adapter`` on top."""
    recorded = adapter_base(adapter) if adapter else None  # also refuses a folder that is not an adapter
    base = model_path or recorded
    if base is None:
        raise ConfigError("--model", "pass --model: a model folder or tiny-llm")
    model, tokenizer = models.load(base, pick_device(device))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def run_generate(args: argparse.Namespace) -> int:
    """The ``generate`` subcommand (its arguments are defined in ``lora_train.llm.add_generate_parser``)."""
    model, tokenizer = load_for_generation(args.model, args.adapter, args.device)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.raw))
    return 0
