"""Masked and weighted statistics (issue 23), against float64 numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dist_utils import run_distributed  # tests/ is on sys.path via its conftest.py
from torch import nn

from statplug import (
    EMAMoments,
    RunningMinMax,
    RunningMoments,
    RunningNorm,
    RunningQuantiles,
    sync_stats,
)

F64 = torch.float64


def _padded(seed: int, lengths: list[int], f: int = 3, dtype=F64):
    """A padded [B, T, F] batch (padding is NaN garbage), its mask, and the ragged rows."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths) + 2
    x = torch.randn(len(lengths), t, f, generator=g, dtype=F64) * 3 + 1e3
    mask = torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    x[~mask] = math.nan
    rows = torch.cat([x[i, :n] for i, n in enumerate(lengths)])
    return x.to(dtype), mask, rows.to(dtype).double().numpy()


@pytest.mark.parametrize("policy", ["raise", "skip", "propagate"])
@pytest.mark.parametrize("lengths", [[5, 1, 7], [0, 3, 0], [9, 9, 9]])
def test_padding_gives_the_statistics_of_the_ragged_sequences(policy, lengths) -> None:
    x, mask, ref = _padded(0, lengths)
    stat = RunningMoments(3, nan_policy=policy)
    stat.update(x, mask=mask)
    assert int(stat.count) == len(ref) and int(stat.n_skipped) == 0
    if len(ref):
        np.testing.assert_allclose(stat.mean.numpy(), ref.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stat.var.numpy(), ref.var(0), rtol=1e-12)
    mm = RunningMinMax(3, accumulator_dtype=F64, nan_policy=policy)
    mm.update(x, mask=mask)
    if len(ref):
        np.testing.assert_array_equal(mm.min.numpy(), ref.min(0))
        np.testing.assert_array_equal(mm.max.numpy(), ref.max(0))
    else:
        assert torch.isinf(mm.min).all() and int(mm.count) == 0


def test_weighted_moments_equal_numpy_average_and_repeated_rows() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 3, generator=g, dtype=F64) * 2 - 7
    w = torch.randint(0, 4, (6, 5), generator=g).to(F64)  # zero weights included
    stat = RunningMoments(3, weighted=True)
    stat.update(x[:3], weight=w[:3])
    stat.update(x[3:], weight=w[3:])
    rows, ww = x.reshape(-1, 3).numpy(), w.reshape(-1).numpy()
    mean = np.average(rows, axis=0, weights=ww)
    var = np.average((rows - mean) ** 2, axis=0, weights=ww)
    np.testing.assert_allclose(stat.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(stat.var.numpy(), var, rtol=1e-12)
    assert stat.weight_sum.item() == ww.sum() and int(stat.count) == int((ww > 0).sum())
    repeated = RunningMoments(3)
    repeated.update(torch.from_numpy(np.repeat(rows, ww.astype(int), axis=0)))
    np.testing.assert_allclose(stat.mean.numpy(), repeated.mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(stat.var.numpy(), repeated.var.numpy(), rtol=1e-12)
    np.testing.assert_allclose(stat.sample_var.numpy(), repeated.sample_var.numpy(), rtol=1e-12)


def test_masked_and_weighted_together_and_all_masked_batches() -> None:
    x, mask, _ = _padded(2, [4, 2, 6])
    w = torch.rand(mask.shape, dtype=F64) + 0.5
    stat = RunningMoments(3, weighted=True)
    stat.update(x, mask=mask, weight=w)
    stat.update(x, mask=torch.zeros_like(mask))  # everything masked: nothing changes
    stat.update(x, mask=mask, weight=torch.zeros_like(w))  # zero weights: nothing either
    rows, ww = x[mask].numpy(), w[mask].numpy()
    mean = np.average(rows, axis=0, weights=ww)
    np.testing.assert_allclose(stat.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(
        stat.var.numpy(), np.average((rows - mean) ** 2, axis=0, weights=ww), rtol=1e-12
    )
    assert int(stat.count) == int(mask.sum())


@pytest.mark.parametrize("cls", [EMAMoments, RunningMinMax])
def test_ema_and_minmax_take_weights_as_row_selection_and_weighting(cls) -> None:
    x, mask, _ = _padded(3, [3, 5])
    w = torch.rand(mask.shape, dtype=F64) * mask
    stat = cls(3, accumulator_dtype=F64, **({"momentum": 1.0} if cls is EMAMoments else {}))
    stat.update(x, weight=w)
    rows, ww = x[mask].numpy(), w[mask].numpy()
    if cls is EMAMoments:  # momentum 1: the batch's weighted moments
        mean = np.average(rows, axis=0, weights=ww)
        np.testing.assert_allclose(stat.mean.numpy(), mean, rtol=1e-12)
        var = np.average((rows - mean) ** 2, axis=0, weights=ww)
        np.testing.assert_allclose(stat.var.numpy(), var, rtol=1e-10)
    else:
        np.testing.assert_array_equal(stat.min.numpy(), rows.min(0))


def test_running_norm_normalises_every_row_and_updates_with_the_kept_ones() -> None:
    x, mask, ref = _padded(4, [6, 2, 4], dtype=torch.float32)
    x = torch.nan_to_num(x, nan=123.0)  # padding holds finite garbage here
    norm = RunningNorm(3)
    y = norm(x, mask=mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    np.testing.assert_allclose(norm.mean.numpy(), ref.mean(0), rtol=1e-6)
    expected = (x.double().numpy() - ref.mean(0)) / np.sqrt(ref.var(0) + norm.eps)
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask": torch.ones(4, dtype=torch.bool)}, "`mask` must be a bool tensor of the sample"),
        ({"mask": torch.ones(2, 4)}, "`mask` must be a bool tensor"),
        ({"weight": torch.ones(2, 4, dtype=torch.int64)}, "`weight` must be a floating"),
        ({"weight": torch.tensor([[1.0, -1.0, 1.0, 1.0]] * 2)}, "finite and >= 0"),
        ({"weight": torch.tensor([[1.0, math.nan, 1.0, 1.0]] * 2)}, "finite and >= 0"),
    ],
)
def test_bad_masks_and_weights_raise_naming_the_stat(kwargs, match) -> None:
    stat = RunningMoments(3, weighted=True)
    stat.stat_name = "enc.stat"
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=match) as info:
        stat.update(x, **kwargs)
    assert str(info.value).startswith("enc.stat")
    assert int(stat.count) == 0


def test_weights_need_a_weighted_stat() -> None:
    with pytest.raises(ValueError, match=r"weighted=True"):
        RunningMoments(3).update(torch.randn(4, 3), weight=torch.ones(4))


def test_an_unweighted_checkpoint_loads_into_a_weighted_stat() -> None:
    plain = RunningMoments(2)
    plain.update(torch.randn(10, 2, dtype=F64))
    weighted = RunningMoments(2, weighted=True)
    weighted.load_state_dict(plain.state_dict())
    assert weighted.weight_sum.item() == 10.0
    torch.testing.assert_close(weighted.var, plain.var)
    assert "weight_sum" not in plain.state_dict()  # an unweighted stat keeps today's layout


def _masked_rank(rank: int, world: int, seed: int) -> dict:
    lengths = [[4, 0, 7], [0, 0, 0], [2, 9, 1]][rank]  # rank 1 holds only padding
    x, mask, _ = _padded(seed + rank, lengths)
    w = torch.linspace(0.5, 2.0, mask.numel(), dtype=F64).reshape(mask.shape)
    stat = RunningMoments(3, weighted=True)
    stat.update(x, mask=mask, weight=w)
    report = sync_stats(stat)
    return {"mean": stat.mean, "var": stat.var, "weight": stat.weight_sum.item(),
            "count": int(stat.count), "calls": report.n_collectives}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_masked_weighted_sync_across_uneven_ranks_with_an_empty_rank(world: int) -> None:
    results = run_distributed(_masked_rank, world, 10)
    rows, weights = [], []
    for rank in range(world):
        lengths = [[4, 0, 7], [0, 0, 0], [2, 9, 1]][rank]
        x, mask, _ = _padded(10 + rank, lengths)
        w = torch.linspace(0.5, 2.0, mask.numel(), dtype=F64).reshape(mask.shape)
        rows.append(x[mask].numpy())
        weights.append(w[mask].numpy())
    data, ww = np.concatenate(rows), np.concatenate(weights)
    mean = np.average(data, axis=0, weights=ww)
    var = np.average((data - mean) ** 2, axis=0, weights=ww)
    for res in results:
        np.testing.assert_allclose(res["mean"].numpy(), mean, rtol=1e-12)
        np.testing.assert_allclose(res["var"].numpy(), var, rtol=1e-10)
        assert res["weight"] == pytest.approx(ww.sum(), rel=1e-15)
        assert res["count"] == len(data) and res["calls"] <= 4


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moments = RunningMoments(3, weighted=True, nan_policy="propagate")
        self.minmax = RunningMinMax(3, nan_policy="skip")
        self.norm = RunningNorm(3, nan_policy="propagate")

    def forward(self, x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        self.moments.update(x, mask=mask, weight=w)
        self.minmax.update(x, mask=mask)
        return self.norm(x, mask=mask)


def test_masks_and_weights_compile_with_inductor_like_eager() -> None:
    torch._dynamo.reset()
    eager, model = _Masked(), _Masked()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    for seed, lengths in enumerate([[3, 5], [1, 6], [4, 0, 2]]):
        x, mask, _ = _padded(seed, lengths, dtype=torch.float32)
        x = torch.nan_to_num(x, nan=7.0)
        w = torch.rand(mask.shape)
        # float32 data near 1e3: eager's float32 kernel and compiled float64 sums differ by
        # an ulp of the mean (6e-5), i.e. ~2e-5 in normalised units
        torch.testing.assert_close(compiled(x, mask, w), eager(x, mask, w), rtol=1e-4, atol=2e-4)
    for (name, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items(),
                                 strict=True):
        # the float32 kernel's batch mean is good to an ulp of 1e3, which enters Chan's cross
        # term: ~4e-6 of m2 (the compiled path sums in float64)
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5, msg=name)


def _reference(cls: type, rows: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """float64 numpy of what each class holds after one masked/weighted batch (momentum 1)."""
    kept = rows[w > 0]
    if cls is RunningMinMax:
        return {"min": kept.min(0), "max": kept.max(0)}
    if cls is RunningQuantiles:
        return {"q": np.quantile(kept, 0.5, axis=0, method="inverted_cdf")}
    mean = np.average(rows, axis=0, weights=w)
    var = np.average((rows - mean) ** 2, axis=0, weights=w)
    return {"mean": mean, "var": var}


@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments, RunningMinMax, RunningQuantiles])
def test_every_class_takes_masks_weights_all_masked_batches_and_zero_weights(cls) -> None:
    x, mask, _ = _padded(5, [6, 3, 0, 8])  # a sample with no real row at all
    g = torch.Generator().manual_seed(2)
    w = torch.randint(0, 3, mask.shape, generator=g).to(F64)  # zero weights included
    kw: dict = {"momentum": 1.0} if cls is EMAMoments else {}
    if cls is RunningMoments:
        kw["weighted"] = True
    stat = cls(3, accumulator_dtype=F64, **kw)
    stat.update(x, mask=torch.zeros_like(mask))  # all masked: nothing changes
    stat.update(x, mask=mask, weight=torch.zeros_like(w))  # all weights zero: nothing either
    assert int(stat.count) == 0
    stat.update(x, mask=mask, weight=w)
    keep = (mask & (w > 0)).numpy()
    assert int(stat.count) == int(keep.sum())
    rows = x.numpy()[mask.numpy()]
    ref = _reference(cls, rows, w.numpy()[mask.numpy()])
    if cls is RunningQuantiles:
        got = stat.quantile(0.5).numpy()
        np.testing.assert_allclose(got, ref["q"], rtol=0.01)  # the sketch's relative accuracy
        return
    for name, value in ref.items():
        np.testing.assert_allclose(getattr(stat, name).double().numpy(), value, rtol=1e-10)


def _class_rank(rank: int, world: int, kind: str) -> dict:
    lengths = [[4, 0, 7], [0, 0, 0], [2, 9, 1]][rank]
    x, mask, _ = _padded(20 + rank, lengths)
    stat = {"minmax": RunningMinMax(3, accumulator_dtype=F64),
            "ema": EMAMoments(3, momentum=1.0, accumulator_dtype=F64),
            "quantiles": RunningQuantiles(3)}[kind]
    stat.update(x, mask=mask)
    sync_stats([stat])
    return {k: v.clone() for k, v in stat.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["minmax", "ema", "quantiles"])
def test_masked_sync_of_every_class_across_three_uneven_ranks(kind: str) -> None:
    results = run_distributed(_class_rank, 3, kind)
    rows = []
    for rank in range(3):
        lengths = [[4, 0, 7], [0, 0, 0], [2, 9, 1]][rank]
        x, mask, _ = _padded(20 + rank, lengths)
        rows.append(x[mask].numpy())
    data = np.concatenate(rows)
    for res in results:
        assert int(res["count"]) == len(data)
        torch.testing.assert_close(res, results[0], rtol=0, atol=0)  # every rank the same
    if kind == "minmax":
        np.testing.assert_array_equal(results[0]["min"].numpy(), data.min(0))
        np.testing.assert_array_equal(results[0]["max"].numpy(), data.max(0))
    elif kind == "quantiles":  # the sketch of the union, bit for bit
        single = RunningQuantiles(3)
        single.update(torch.from_numpy(data))
        assert torch.equal(results[0]["counts"], single.counts)
