"""RunningMoments' small-batch ring: each batch of <= 1024 float32 rows is one kernel call that
writes its column means and variances into a ring row; the ring is folded into float64 sums when
full, when the batch size changes, or when read. Every test compares against float64 numpy over
the same float32 data, or a fresh object fed the same batches."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from statplug import RunningMoments, RunningNorm


def _ref(batches: list[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    data = np.concatenate(batches).astype(np.float64)
    return data.shape[0], data.mean(0), data.var(0)


def _check(stat: RunningMoments, batches: list[np.ndarray], rtol: float = 1e-6) -> None:
    n, mean, var = _ref(batches)
    assert stat.count.item() == n
    np.testing.assert_allclose(stat.mean.double().numpy(), mean, rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(stat.var.double().numpy(), var, rtol=rtol)


def _float32_batches(rng: np.random.Generator, sizes: list[int], f: int, loc: float = 0.0):
    return [rng.normal(loc, 1.0, size=(n, f)).astype(np.float32) for n in sizes]


@pytest.mark.parametrize("loc", [0.0, 1e4])
def test_changing_batch_sizes_across_ring_windows_match_float64(loc):
    rng = np.random.default_rng(0)
    # Sizes change inside windows, include single rows (no variance row) and both sides of 1024.
    sizes = [5] * 40 + [1] * 7 + [2, 2, 1, 3] + [1024] * 3 + [1025] + [17] * 33 + [1]
    batches = _float32_batches(rng, sizes, 6, loc)
    stat = RunningMoments(6, accumulator_dtype=torch.float64)
    for b in batches:
        stat.update(torch.from_numpy(b))
    _check(stat, batches, rtol=1e-6 if loc == 0 else 1e-4)


def test_reads_in_the_middle_of_a_window_change_nothing():
    rng = np.random.default_rng(1)
    batches = _float32_batches(rng, [64] * 50, 4)
    read, plain = RunningMoments(4), RunningMoments(4)
    for i, b in enumerate(batches):
        read.update(torch.from_numpy(b))
        plain.update(torch.from_numpy(b))
        if i % 7 == 3:
            _check(read, batches[: i + 1])
    _check(read, batches)
    torch.testing.assert_close(read.var, plain.var, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_raise_mid_window_leaves_no_trace_in_later_updates(bad):
    rng = np.random.default_rng(2)
    batches = _float32_batches(rng, [32] * 20, 3)
    stat = RunningMoments(3)
    for b in batches[:10]:
        stat.update(torch.from_numpy(b))
    x = torch.from_numpy(batches[0].copy())
    x[4, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        stat.update(x)
    for b in batches[10:]:  # the next batch reuses the ring row the bad one was written to
        stat.update(torch.from_numpy(b))
    _check(stat, batches)


@pytest.mark.parametrize("clear", ["reset", "load"])
def test_propagated_nan_is_gone_after_reset_or_load(clear):
    rng = np.random.default_rng(3)
    batches = _float32_batches(rng, [16] * 10, 2)
    stat = RunningMoments(2, nan_policy="propagate")
    stat.update(torch.from_numpy(batches[0]))
    clean = copy.deepcopy(stat.state_dict())
    x = torch.from_numpy(batches[1].copy())
    x[0, 0] = float("nan")
    for _ in range(40):  # NaN rows written all round the ring
        stat.update(x)
    assert torch.isnan(stat.mean[0])
    if clear == "reset":
        stat.reset()
        rest = batches[2:]
    else:
        stat.load_state_dict(clean)
        rest = [batches[0], *batches[2:]]
    for b in batches[2:]:
        stat.update(torch.from_numpy(b))
    _check(stat, rest)


def test_model_conversion_and_copies_in_the_middle_of_a_window():
    rng = np.random.default_rng(4)
    batches = _float32_batches(rng, [8] * 30, 5)
    model = nn.Module()
    model.stat = RunningMoments(5)
    for b in batches[:10]:
        model.stat.update(torch.from_numpy(b))
    model.double()  # rebinds every buffer; the ring stays float32 and its rows are re-viewed
    model.float()
    copied = copy.deepcopy(model)
    pickled = pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    for m in (model, copied, pickled, saved):
        for b in batches[10:]:
            m.stat.update(torch.from_numpy(b))
        _check(m.stat, batches)
    # The copies share no ring memory with the original.
    model.stat.update(torch.full((8, 5), 100.0))
    _check(copied.stat, batches)


def test_first_update_in_inference_mode_then_in_training():
    rng = np.random.default_rng(5)
    batches = _float32_batches(rng, [10] * 6, 3)
    stat = RunningMoments(3)
    with torch.inference_mode():
        stat.update(torch.from_numpy(batches[0]))
    for b in batches[1:]:
        stat.update(torch.from_numpy(b))
    _check(stat, batches)


def test_wide_features_use_a_shorter_ring_and_stay_exact():
    rng = np.random.default_rng(6)
    f = 8192
    stat = RunningMoments(f)
    rows = stat._buffers["_ring_mean"].shape[0]
    assert rows * f <= 1 << 16 or rows == 2  # bounded memory per stat
    batches = _float32_batches(rng, [4] * (2 * rows + 3), f)
    for b in batches:
        stat.update(torch.from_numpy(b))
    _check(stat, batches, rtol=1e-5)


def test_inputs_needing_grad_views_and_strides_take_the_ring_exactly():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(6, 40)).astype(np.float32)
    stat = RunningMoments(6)
    leaf = torch.from_numpy(base.T.copy()).requires_grad_()
    stat.update(leaf * 1.0)  # requires grad
    stat.update(torch.from_numpy(base).t())  # non-contiguous [40, 6]
    stat.update(torch.from_numpy(base.T.copy()).view(4, 10, 6))  # N-D batch of rows
    assert leaf.grad is None and not stat.mean.requires_grad
    _check(stat, [base.T] * 3)


def test_running_norm_train_forward_reads_through_the_ring():
    rng = np.random.default_rng(8)
    batches = _float32_batches(rng, [20] * 12, 3, loc=5.0)
    norm = RunningNorm(3)
    for i, b in enumerate(batches):
        y = norm(torch.from_numpy(b))
        n, mean, var = _ref(batches[: i + 1])
        if n >= 2:
            expect = (b.astype(np.float64) - mean) / np.sqrt(var + norm.eps)
            np.testing.assert_allclose(y.double().numpy(), expect, rtol=1e-4, atol=1e-5)


def test_a_whole_module_pickled_before_the_ring_loads_with_its_pending_batches():
    """statplug before the ring kept small batches as float32 sums `_p1`/`_p2` around a
    float32-exact shift, with `pending_steps` in a `__slots__` host object pickled by default
    as (None, slots). Such a pickle is rebuilt here from a current stat; unpickling must fold
    those sums (count, mean and variance of every batch) and drop the old buffers."""
    rng = np.random.default_rng(9)
    batches = _float32_batches(rng, [6] * 5, 3, loc=50.0)
    stat = RunningMoments(3, accumulator_dtype=torch.float64)
    stat.update(torch.from_numpy(batches[0]))
    stat._flush()  # folds the first batch: shift K = its mean, now in the float64 sums
    shift = stat._shift.clone()
    d = [torch.from_numpy(b.astype(np.float64)) - shift for b in batches[1:]]
    p1 = sum(x.sum(0) for x in d).float()
    p2 = sum((x * x).sum(0) for x in d).float()
    state = stat.__dict__.copy()
    state["_buffers"] = {k: v for k, v in stat._buffers.items() if not k.startswith("_ring")}
    state["_buffers"].update(_p1=p1, _p2=p2, _shift32=shift.float())
    state["_non_persistent_buffers_set"] = set(stat._non_persistent_buffers_set) - {
        "_ring_mean", "_ring_var"
    } | {"_p1", "_p2", "_shift32"}
    del state["_row_features"]
    host = {"dirty": True, "pending_n": 6 * 4, "pending_steps": 4, "shift_set": True}
    state["_host"] = type(stat._host).__new__(type(stat._host))
    state["_host"].__setstate__((None, host))
    old = RunningMoments.__new__(RunningMoments)
    old.__setstate__(state)
    loaded = pickle.loads(pickle.dumps(old))
    _check(loaded, batches)
    assert not {"_p1", "_p2", "_shift32"} & set(dict(loaded.named_buffers()))
    loaded.update(torch.from_numpy(batches[0]))  # the ring works afterwards
    _check(loaded, [*batches, batches[0]])
