"""Run-scoped patches that make a Forge-family UNet trainable (prototype for issue #15, Forge Classic).

Forge Classic (Haoming02/sd-webui-forge-classic) and lllyasviel's Forge build the UNet from
``ldm_patched.ldm.modules.attention``, whose ``BasicTransformerBlock._forward`` adds residuals in place
(``x += n`` after self-attention, again after cross-attention, ``x += x_skip`` after the feed-forward).
``norm2`` / ``norm3`` save ``x`` for their backward, so the second ``x += n`` bumps the version of a tensor
autograd still needs, and the first backward fails with "one of the variables needed for gradient computation
has been modified by an inplace operation ... output 0 of Add, is at version 2; expected version 1".
(reForge's copy of the block writes ``x = n + x`` and trains as is.)

``out_of_place_transformer_blocks(model)`` is a context manager for one training run. It finds those blocks by
walking ``model.modules()`` and matching the class by name and module path (nothing from Forge is imported),
and gives each one an instance-level ``_forward`` (``forward`` where the class has no ``_forward``) that runs
the class's own code with every augmented ``+=`` on a tensor made out of place: a ``TorchFunctionMode``
answers the ``Tensor.add_`` that ``+=`` becomes with ``torch.add`` -- only for calls made from the block's own
method body. ``x += n`` rebinds ``x`` either way, so the block
computes the same values with the same kernels -- bit-identical output -- while the tensors autograd saved stay
untouched. Forge's source is never edited or copied, so it keeps working across Forge versions as long as the
block only relies on ``+=`` rebinding (it does: every ``+=`` there is on a local).

On exit -- normal, exception, or a Stop that raises through the run -- every instance attribute set here is
deleted again, so the class's own method (Forge's in-place one) is what generation uses afterwards; blocks that
already had an instance-level override (another extension's patch) are left alone and reported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

#: (module path prefix, class name) of blocks whose forward adds in place; matched on type(m).__module__.
IN_PLACE_BLOCKS: tuple[tuple[str, str], ...] = (
    ("ldm_patched.ldm.modules.attention", "BasicTransformerBlock"),  # Forge Classic, reForge (ff_in path only)
    ("backend.nn.unet", "BasicTransformerBlock"),  # lllyasviel Forge 2.x / Neo (same += pattern)
)


class _OutOfPlaceIAdd(TorchFunctionMode):
    """``a += b`` written in the block's own body becomes ``a = a + b`` (``+=`` rebinds ``a`` either way).

    ``a += b`` on a tensor reaches torch functions as ``Tensor.add_``; only calls made directly from ``code`` (the
    block's method, i.e. its ``+=`` statements) are turned out of place, so in-place ops inside attention kernels
    or anything the block calls keep their meaning. Only while grad is enabled: inference is left exactly as is.
    """

    def __init__(self, code: Any):
        super().__init__()
        self.code = code

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is _ADD_ or func is _IADD) and torch.is_grad_enabled() and sys._getframe(1).f_code is self.code:
            return torch.add(*args, **kwargs)
        return func(*args, **kwargs)


_ADD_ = torch.Tensor.add_
_IADD = torch.Tensor.__iadd__


def is_in_place_block(module: nn.Module) -> bool:
    cls = type(module)
    return any(cls.__name__ == name and cls.__module__.startswith(path) for path, name in IN_PLACE_BLOCKS)


@dataclass
class PatchReport:
    patched: int = 0
    skipped: list[str] = field(default_factory=list)  # names of blocks that already had an instance override
    method: str = ""


def _wrap(bound: Any) -> Any:
    code = bound.__func__.__code__

    def out_of_place(*args: Any, **kwargs: Any) -> Any:
        with _OutOfPlaceIAdd(code):
            return bound(*args, **kwargs)

    out_of_place.__lora_train_out_of_place__ = True  # type: ignore[attr-defined]
    return out_of_place


@contextmanager
def out_of_place_transformer_blocks(model: nn.Module) -> Iterator[PatchReport]:
    """For the duration of the ``with``: every in-place-adding transformer block of ``model`` adds out of place.

    Idempotent per block and exception-safe: what was set is removed in ``finally``.
    """
    report = PatchReport()
    patched: list[tuple[nn.Module, str]] = []
    try:
        for name, module in model.named_modules():
            if not is_in_place_block(module):
                continue
            method = "_forward" if callable(getattr(type(module), "_forward", None)) else "forward"
            if method in vars(module):  # already overridden on the instance (by us or someone else): leave it
                if not getattr(vars(module)[method], "__lora_train_out_of_place__", False):
                    report.skipped.append(name)
                continue
            # the class's function bound to this instance (not getattr(module, method), which could be a hook)
            bound = getattr(type(module), method).__get__(module, type(module))
            setattr(module, method, _wrap(bound))
            patched.append((module, method))
            report.method = method
        report.patched = len(patched)
        yield report
    finally:
        for module, method in reversed(patched):
            if getattr(vars(module).get(method), "__lora_train_out_of_place__", False):
                delattr(module, method)


#: (module path, class qualname) of Forge's own Linear layers: an ``nn.Module`` with ``weight``/``bias``/
#: ``in_features``/``out_features`` and ``F.linear`` in its forward, but not an ``nn.Linear``, so neither kohya's
#: target rule nor peft would wrap it (backend/operations.py ``ForgeOperations.Linear``, Forge 2 and Neo).
FORGE_LINEARS: tuple[tuple[str, str], ...] = (("backend.operations", "ForgeOperations.Linear"),)
_AS_LINEAR: dict[type, type] = {}


def is_forge_linear(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__qualname__) in FORGE_LINEARS and not isinstance(module, nn.Linear)


def _linear_class(cls: type) -> type:
    """``cls`` with ``nn.Linear`` as a second base: Forge's forward and attributes, ``isinstance(m, nn.Linear)``."""
    if cls not in _AS_LINEAR:
        _AS_LINEAR[cls] = type(cls.__name__, (cls, nn.Linear), {"__module__": cls.__module__,
                                                               "__lora_train_as_linear__": True})
    return _AS_LINEAR[cls]


@contextmanager
def forge_linears_as_nn_linear(roots: list[nn.Module]) -> Iterator[int]:
    """For the duration of the ``with``: every Forge Linear under ``roots`` is an instance of a subclass that also
    derives from ``nn.Linear`` (its ``__class__`` swapped), so peft wraps it like any Linear. Its own ``forward``,
    weights and attributes are untouched; the original class is back on exit, also after an exception.
    Yields how many modules were swapped."""
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for root in roots:
            for module in root.modules():
                if is_forge_linear(module):
                    original = type(module)
                    module.__class__ = _linear_class(original)
                    swapped.append((module, original))
        yield len(swapped)
    finally:
        for module, original in swapped:
            module.__class__ = original
