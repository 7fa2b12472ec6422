"""forge_patches: Forge Classic's in-place-adding BasicTransformerBlock trains inside the context, and is back
to its own method afterwards (also after an exception); outputs are bit-identical."""

import sys
import types

import pytest
import torch
from torch import nn

from lora_train.webui.forge_patches import is_in_place_block, out_of_place_transformer_blocks

MODULE = "ldm_patched.ldm.modules.attention"


@pytest.fixture(scope="module")
def block_class():
    mod = types.ModuleType(MODULE)
    sys.modules.setdefault(MODULE, mod)

    class BasicTransformerBlock(nn.Module):  # Forge Classic's pattern: x += n after each sub-layer
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.checkpoint = False

        def forward(self, x):
            return self._forward(x)

        def _forward(self, x):
            n = self.a(self.norm1(x))
            x += n
            n = self.b(self.norm2(x))
            x += n
            return x

    BasicTransformerBlock.__module__ = MODULE
    return BasicTransformerBlock


def _setup(block_class):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), block_class())
    model.requires_grad_(False)
    lora = nn.Parameter(torch.zeros(8, 8))
    x = torch.randn(2, 8)
    return model, lora, x, lambda: model[1](model[0](x) + x @ lora).sum()


def test_in_place_block_fails_without_and_trains_with_the_patch(block_class):
    model, lora, x, loss = _setup(block_class)
    assert is_in_place_block(model[1]) and not is_in_place_block(model[0])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss().backward()
    with torch.no_grad():
        before = model[1](model[0](x))
    with out_of_place_transformer_blocks(model) as report:
        assert report.patched == 1 and report.method == "_forward"
        loss().backward()
        with torch.no_grad():
            during = model[1](model[0](x))
    assert lora.grad is not None and lora.grad.abs().sum() > 0
    assert torch.equal(before, during)
    assert "_forward" not in vars(model[1])


def test_restored_after_an_exception_and_other_overrides_left_alone(block_class):
    model, *_ = _setup(block_class)
    with pytest.raises(KeyError):
        with out_of_place_transformer_blocks(model):
            assert "_forward" in vars(model[1])
            raise KeyError("stop")
    assert "_forward" not in vars(model[1])
    theirs = model[1]._forward
    model[1]._forward = theirs  # someone else's instance override
    with out_of_place_transformer_blocks(model) as report:
        assert report.patched == 0 and report.skipped == ["1"]
    assert vars(model[1])["_forward"] is theirs
