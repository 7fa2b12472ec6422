"""Proof that training left the host's model as it found it: take a snapshot before, verify after.

Hashing every byte of a model (2 GB for SD1.5, 7 GB for SDXL) took ~15 s per job on a CPU, twice, while the
WebUI waited for the queue lock. The quick snapshot (default) records for every tensor what any change would
alter: the tensor object, its storage address, dtype, shape, device and autograd version counter (every in-place
write through the tensor bumps it), plus a hash of an evenly spaced sample of its values (which catches writes
through ``.data``, which have their own counter). ``full=True`` hashes every byte (a Setting in the WebUI).
Beyond tensors: requires_grad, train/eval, the module tree (a leftover LoRA wrapper changes it) and per-instance
``forward`` overrides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SAMPLE_VALUES = 1024
_CHUNK = 1 << 26


@dataclass
class HostSnapshot:
    """Everything about a host model that training must leave as it found it."""

    model: nn.Module
    full: bool = False
    tensors: dict[str, tuple] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    training: dict[str, bool] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    forward_overrides: set[str] = field(default_factory=set)

    @classmethod
    def take(cls, model: nn.Module, full: bool = False) -> HostSnapshot:
        snap = cls(model, full)
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        snap.tensors = {name: _record(t, full) for name, t in named if t is not None}
        snap.requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        modules = list(model.named_modules(remove_duplicate=False))
        snap.training = {n: m.training for n, m in modules}
        snap.modules = {n: type(m).__qualname__ for n, m in modules}
        snap.forward_overrides = {n for n, m in modules if "forward" in m.__dict__}
        return snap

    def diff(self, requires_grad: bool = True) -> list[str]:
        """Human-readable differences between the snapshot and the model now (empty when identical);
        ``requires_grad=False`` leaves the flags out (see ``verify``)."""
        now = HostSnapshot.take(self.model, self.full)
        compared = [("tensor", self.tensors, now.tensors), ("training", self.training, now.training),
                    ("module", self.modules, now.modules)]
        if requires_grad:
            compared.insert(1, ("requires_grad", self.requires_grad, now.requires_grad))
        problems = []
        for label, before, after in compared:
            for name in sorted(before.keys() | after.keys()):
                if before.get(name) != after.get(name):
                    problems.append(f"{label} {name}: {_short(before.get(name))} -> {_short(after.get(name))}")
        for name in sorted(self.forward_overrides ^ now.forward_overrides):
            state = "added" if name in now.forward_overrides else "removed"
            problems.append(f"instance forward override on {name!r} {state}")
        return problems

    def verify(self, requires_grad: bool = True) -> None:
        """Raise RuntimeError listing the first differences if the host model changed. ``requires_grad=False``
        for what only generated images (the grid): Forge's patchers put each LoRA-patched weight back as a new
        ``Parameter(requires_grad=False)`` over the same storage, as after any ``<lora:…>`` txt2img there."""
        problems = self.diff(requires_grad)
        if problems:
            shown = "\n  ".join(problems[:20])
            raise RuntimeError(f"host model changed in {len(problems)} place(s):\n  {shown}")


def _short(value: Any) -> str:
    return str(value[0])[:12] if isinstance(value, tuple) else str(value)


def _record(tensor: torch.Tensor, full: bool) -> tuple:
    """What must not change about one tensor: all bytes (full), or object, version and sampled values (quick)."""
    placement = (str(tensor.dtype), tuple(tensor.shape), str(tensor.device), tensor.data_ptr())
    if full:
        return (_full_digest(tensor), *placement)
    return (_sample_digest(tensor), *placement, id(tensor), tensor._version)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8)


def _sample_digest(tensor: torch.Tensor) -> str:
    """blake2b of up to SAMPLE_VALUES evenly spaced values (all of them for small tensors)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE_VALUES)
    picked = flat[::step][:SAMPLE_VALUES]
    if picked.numel() == 0:
        return ""
    return hashlib.blake2b(_bytes(picked).cpu().numpy().tobytes(), digest_size=16).hexdigest()


def _full_digest(tensor: torch.Tensor) -> str:
    """blake2b of the raw bytes, copied to the CPU in chunks so a GPU model is hashed without a second copy."""
    digest = hashlib.blake2b(digest_size=16)
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return digest.hexdigest()
    raw = _bytes(flat)
    for start in range(0, raw.numel(), _CHUNK):
        digest.update(raw[start : start + _CHUNK].cpu().numpy().tobytes())
    return digest.hexdigest()
