"""The host's requires_grad and train/eval flags, captured before training and put back whatever happens.

The WebUI trains its live model: a flag left flipped would change every later generation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
