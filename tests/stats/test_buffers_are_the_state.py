"""A stat's whole state is its buffers (DESIGN.md section 7): raw buffers, ``state_dict`` and the
read-outs agree after every call; copying buffers copies the stat; a reloaded copy stays
bit-identical through later updates and merges."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call

from statplug import EMAMoments, RunningMinMax, RunningMoments, RunningNorm

CLASSES = (RunningMoments, EMAMoments, RunningMinMax, RunningNorm)


def _batches(seed: int, n: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 7, 16, 300, 1025, 3]
    return [torch.randn(sizes[i % len(sizes)], 5, generator=g) * 2 + 50 for i in range(n)]


@pytest.mark.parametrize("cls", CLASSES)
def test_raw_buffers_are_current_right_after_an_update(cls) -> None:
    stat = cls(5)
    data = []
    for x in _batches(0):
        stat.update(x)
        data.append(x)
        raw = dict(stat.named_buffers())
        prefix = "moments." if cls is RunningNorm else ""
        ref = torch.cat(data).double().numpy()
        # Read straight from the buffers: no property, no state_dict() in between.
        assert raw[prefix + "count"].item() == len(ref)
        if cls in (RunningMoments, RunningNorm):
            np.testing.assert_allclose(raw[prefix + "mean"].numpy(), ref.mean(0), rtol=1e-6)
            m2 = raw[prefix + "m2"].double().numpy()
            np.testing.assert_allclose(m2 / len(ref), ref.var(0), rtol=1e-4)
        if cls is RunningMinMax:
            np.testing.assert_array_equal(raw["min"].numpy(), ref.min(0).astype(np.float32))
            np.testing.assert_array_equal(raw["max"].numpy(), ref.max(0).astype(np.float32))
        state = stat.state_dict()
        for key, value in state.items():
            assert torch.equal(value, raw[key]), key


@pytest.mark.parametrize("cls", CLASSES)
def test_copying_every_buffer_copies_the_stat(cls) -> None:
    a, b = cls(5), cls(5)
    for x in _batches(1)[:5]:
        a.update(x)
    for (_, src), (_, dst) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        dst.copy_(src)  # what averaging callbacks and Lightning's swaps do
    for x in _batches(2)[:6]:
        a.update(x)
        b.update(x)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("cls", CLASSES)
def test_a_reloaded_copy_stays_bit_identical_through_later_updates_and_merges(cls) -> None:
    a = cls(5)
    for x in _batches(3)[:5]:
        a.update(x)
    b = cls(5)
    b.load_state_dict(a.state_dict())
    other = cls(5)
    other.update(_batches(4)[0])
    for i, x in enumerate(_batches(5)):
        a.update(x)
        b.update(x)
        if i == 3:
            a.merge_(copy.deepcopy(other))
            b.merge_(copy.deepcopy(other))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_functional_call_sees_the_state_in_the_buffers_it_is_given() -> None:
    # torch.func substitutes buffers: a normaliser run on another stat's buffers normalises by
    # that stat's statistics, because nothing lives outside them.
    fitted, blank = RunningNorm(5), RunningNorm(5)
    for x in _batches(6):
        fitted(x)
    fitted.eval(), blank.eval()
    x = _batches(7)[2]
    buffers = dict(fitted.named_buffers())
    torch.testing.assert_close(functional_call(blank, buffers, (x,)), fitted(x))
