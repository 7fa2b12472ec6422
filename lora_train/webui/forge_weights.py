"""Make Forge 2's frozen weights trainable through: inference tensors become ordinary tensors, in place.

Forge 2 and Neo load checkpoints under ``torch.inference_mode()`` (backend/loader.py ``forge_loader``,
modules/sd_models.py ``forge_model_reload``), and its LoRA loader merges under it too, so every weight is an
inference tensor, which autograd cannot save for backward: a LoRA layer's input, or a frozen weight a gradient
flows through, fails the first backward. A clone made outside inference mode is an ordinary tensor with the same
values, and an ordinary tensor serves inference as well as before. Replacing each tensor by its clone in the
module's own ``_parameters`` / ``_buffers`` entry (every module that registers it, e.g. Forge's textual-inversion
wrapper shares the token embedding's weight), and dropping the old one before cloning the next, costs one tensor
of extra memory at the peak, never a second model. Nothing needs undoing afterwards: the values are the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

TRAINABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# On CPU, glibc keeps the freed weights' heap pages (most are below its 32 MiB mmap threshold), so without a trim
# the process grew by 4.8 GB while converting a real SDXL (Forge 2, CPU) and shrank only at the end; trimming every
# few hundred MB keeps the growth near what was cloned since the last trim.
TRIM_EVERY_BYTES = 256 * 2**20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, which gives freed heap pages back to the OS; None where there is no glibc."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def inference_tensor_count(modules: Iterable[nn.Module]) -> int:
    """How many distinct parameters and buffers of ``modules`` are inference tensors."""
    return len({id(t) for _, _, t in _entries(modules) if t.is_inference()})


def make_ordinary_in_place(modules: Iterable[nn.Module]) -> int:
    """Replace every inference-tensor parameter and buffer of ``modules`` by an ordinary clone, one at a time.

    A parameter stays a Parameter with its ``requires_grad`` and any attributes Forge set on it. Returns how many
    distinct tensors were replaced.
    """
    holders: dict[int, list[tuple[dict, str]]] = {}
    for registry, name, tensor in _entries(modules):
        if tensor.is_inference():
            holders.setdefault(id(tensor), []).append((registry, name))
    cloned = 0
    with torch.inference_mode(False):
        for places in holders.values():
            registry, name = places[0]
            old = registry[name]
            new = old.detach().clone()  # outside inference mode: an ordinary tensor
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
                vars(new).update(vars(old))
            for registry, name in places:
                registry[name] = new
            if new.device.type == "cpu":
                cloned += new.numel() * new.element_size()
            del old, new  # the last reference to the inference tensor: freed before the next clone
            trim = _malloc_trim() if cloned >= TRIM_EVERY_BYTES else None
            if trim is not None:
                trim(0)
                cloned = 0
    return len(holders)


def untrainable_dtypes(modules: Iterable[nn.Module]) -> set[str]:
    """Storage kinds no optimizer step or autograd pass supports: fp8 / int / bnb / gguf weights."""
    found = set()
    for _, _, tensor in _entries(modules, buffers=False):
        quantised = getattr(tensor, "bnb_quantized", None) is not None or getattr(tensor, "gguf_cls", None) is not None
        if quantised or tensor.dtype not in TRAINABLE_DTYPES:
            found.add(type(tensor).__name__ if quantised else str(tensor.dtype).replace("torch.", ""))
    return found


def _entries(modules: Iterable[nn.Module], buffers: bool = True):
    """(registry dict, name, tensor) for every registered parameter (and buffer) of every module, once per module."""
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            registries = (module._parameters, module._buffers) if buffers else (module._parameters,)
            for registry in registries:
                for name, tensor in registry.items():
                    if tensor is not None:
                        yield registry, name, tensor
