"""LoRA for causal language models (``task_type: text-generation`` / ``task: llm``), CLI only.

This module stays light (no torch/transformers import) so the CLI can ask ``is_llm_config`` cheaply; the
WebUI path never imports any of ``lora_train.llm``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_train.llm.config import is_llm_config, read_yaml


def is_llm_config_file(path: str | Path, overrides: list[str] | None = None) -> bool:
    """Whether ``path`` (with ``--set`` overrides) is a text-generation config."""
    return is_llm_config(read_yaml(path, overrides))


def run(config_path: str | Path, overrides: list[str] | None = None, callbacks=None, merge: bool = False):
    """Train from a YAML file as ``python -m lora_train train`` does; returns the engine's TrainResult."""
    from lora_train.llm import config, train

    return train.train(config.load(config_path, overrides), callbacks, merge=merge)


def _run_generate(args: argparse.Namespace) -> int:
    from lora_train.llm.generate import run_generate

    return run_generate(args)


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``generate`` to the CLI; ``subparsers`` is its ``add_subparsers()`` result."""
    parser = subparsers.add_parser("generate", help="try a text-generation LoRA adapter on a prompt")
    parser.add_argument("--model", help="base model folder, or tiny-llm (default: the base the adapter names)")
    parser.add_argument("--adapter", help="adapter folder written by a text-generation run")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the training format")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(func=_run_generate)
    return parser


__all__ = ["add_generate_parser", "is_llm_config", "is_llm_config_file", "run"]
