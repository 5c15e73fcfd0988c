"""RunningQuantiles and QuantileNorm against independent references.

Accuracy is measured against ``numpy.quantile(..., method="inverted_cdf")`` (the definition the
sketch implements: the sample of rank ``ceil(q * n)``); merges and syncs against the sketch of
the union of the data, bit for bit; the normaliser against numpy's quantiles.
"""

from __future__ import annotations

import importlib.util
import io
import math
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from dist_utils import run_distributed

from statplug import CheckpointMismatchError, QuantileNorm, RunningQuantiles, sync_stats

QS = np.array([0.01, 0.5, 0.99])
# The bucket index is computed in the input's float precision: a value within float rounding
# of a bucket edge may land in the neighbour, whose representative is then off by a hair more.
ROUNDING = 1e-5


def _benchmark_module() -> ModuleType:
    """``benchmarks/quantiles.py``: the tests use the distributions its accuracy table reports."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quantiles.py"
    spec = importlib.util.spec_from_file_location("_statplug_benchmarks_quantiles", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_BENCH = _benchmark_module()
_KINDS = {"normal": "normal", "lognormal": "lognormal", "cauchy": "cauchy", "mixed": "mixed",
          "span": "span 1e-6..1e6"}


def _data(kind: str, n: int = 20_000, f: int = 3, seed: int = 0) -> np.ndarray:
    """float32 data: normal, log-normal, Cauchy, mixed-sign with 5% zeros, or magnitudes
    spanning 1e-6..1e6 with both signs."""
    x: np.ndarray = _BENCH.make_data(_KINDS[kind], n, f, seed)
    return x


def _reference(x: np.ndarray, qs: np.ndarray) -> np.ndarray:
    return np.quantile(x.astype(np.float64), qs, axis=0, method="inverted_cdf")


def _sketch_of(x: np.ndarray, chunks: int = 1, **kwargs: object) -> RunningQuantiles:
    s = RunningQuantiles(x.shape[1:], **kwargs)  # type: ignore[arg-type]
    for part in np.array_split(x, chunks):
        s.update(torch.from_numpy(np.ascontiguousarray(part)))
    return s


def _assert_within(est: np.ndarray, ref: np.ndarray, accuracy: float) -> None:
    err = np.abs(est - ref)
    bound = accuracy * np.abs(ref) * (1 + ROUNDING)
    assert (err <= bound).all(), (est, ref, (err / np.abs(ref)).max())


def _state(s: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in s.state_dict().items()}


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("kind", ["normal", "lognormal", "cauchy", "mixed", "span"])
def test_quantiles_within_relative_accuracy_of_numpy(kind: str) -> None:
    x = _data(kind)
    s = _sketch_of(x, chunks=7)
    est = s.quantile(torch.tensor(QS)).numpy()
    _assert_within(est, _reference(x, QS), 0.01)
    assert s.count.item() == x.shape[0]


@pytest.mark.parametrize(("accuracy", "buckets"), [(0.001, 16384), (0.05, 2048)])
def test_every_quantile_within_the_requested_accuracy(accuracy: float, buckets: int) -> None:
    x = _data("span", n=5000, f=2, seed=3)
    qs = np.linspace(0.0, 1.0, 101)
    s = _sketch_of(x, relative_accuracy=accuracy, max_buckets=buckets)
    assert s.magnitude_range[0] < 1e-6 and s.magnitude_range[1] > 1e6
    _assert_within(s.quantile(torch.tensor(qs)).numpy(), _reference(x, qs), accuracy)


def test_zero_min_and_max_are_exact() -> None:
    x = _data("mixed", n=3000, seed=1)
    s = _sketch_of(x, chunks=3)
    assert torch.equal(s.min, torch.from_numpy(x.min(0)).double())
    assert torch.equal(s.max, torch.from_numpy(x.max(0)).double())
    ends = s.quantile(torch.tensor([0.0, 1.0])).numpy()
    np.testing.assert_array_equal(ends, _reference(x, np.array([0.0, 1.0])))
    # 5% zeros around the 1/3 quantile of N(-1, 3): the sketch gives 0 exactly there.
    zero_q = (x < 0).mean(0) + 0.01
    for j in range(x.shape[1]):
        ref = _reference(x[:, j : j + 1], np.array([zero_q[j]]))
        assert ref.item() == 0.0
        assert s.quantile(float(zero_q[j]))[j].item() == 0.0


def test_values_outside_the_window_are_clamped_into_min_max() -> None:
    s = RunningQuantiles(1, max_buckets=64)  # a window of about 1/1.9 .. 1.9
    low, high = s.magnitude_range
    assert low < 1 < high
    x = torch.tensor([[1e-12], [1.0], [1e12]], dtype=torch.float64)
    s.update(x)
    q = s.quantile(torch.tensor([0.0, 1 / 3, 2 / 3, 1.0], dtype=torch.float64)).flatten().tolist()
    assert q[0] == 1e-12 and q[-1] == 1e12  # exact extremes
    assert abs(q[2] - 1.0) <= 0.01  # inside the window: the guarantee holds
    assert 1e-12 <= q[1] <= 1e12


def test_quantile_shapes_and_empty_sketch() -> None:
    s = RunningQuantiles((2, 3))
    assert torch.isnan(s.quantile(0.5)).all() and s.quantile(0.5).shape == (2, 3)
    x = torch.randn(100, 2, 3)
    s.update(x)
    assert s.quantile(0.5).shape == (2, 3)
    assert s.quantile(torch.tensor([0.1, 0.5, 0.9])).shape == (3, 2, 3)
    assert s.quantile([0.1, 0.9]).shape == (2, 2, 3)
    assert s.quantile(0.5).dtype == torch.float64
    ref = _reference(x.reshape(100, 6).numpy(), np.array([0.5])).reshape(2, 3)
    _assert_within(s.q50.numpy(), ref, 0.01)
    for bad in (1.5, -0.1, math.nan, "0.5"):
        with pytest.raises(ValueError, match="`q`"):
            s.quantile(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`q`"):
        s.quantile(torch.tensor([0.5, 2.0]))


def test_arguments_are_checked() -> None:
    for bad in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="RunningQuantiles: `relative_accuracy`"):
            RunningQuantiles(2, relative_accuracy=bad)
    for bad_buckets in (0, -3, 2.5, True, 2**21):
        with pytest.raises(ValueError, match="RunningQuantiles: `max_buckets`"):
            RunningQuantiles(2, max_buckets=bad_buckets)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="QuantileNorm: `low` must be below `high`"):
        QuantileNorm(2, low=0.9, high=0.1)


# ------------------------------------------------------------------ merges
def test_merge_equals_the_sketch_of_the_union_bit_for_bit() -> None:
    x = _data("span", n=5000, seed=2)
    a, b = _sketch_of(x[:1234]), _sketch_of(x[1234:], chunks=3)
    union = _sketch_of(x)
    a2, b2 = _sketch_of(x[:1234]), _sketch_of(x[1234:], chunks=3)
    _assert_same_state(a.merge_(b), union)
    _assert_same_state(b2.merge_(a2), union)  # order does not matter
    empty = RunningQuantiles(x.shape[1])
    _assert_same_state(empty.merge_(union), union)
    with pytest.raises(ValueError, match=re.escape("relative_accuracy=0.01 and max_buckets=2048")):
        union.merge_(RunningQuantiles(x.shape[1], relative_accuracy=0.02))


def test_reset_and_freeze() -> None:
    x = torch.from_numpy(_data("normal", n=100))
    s = RunningQuantiles(3)
    s.update(x)
    s.freeze()
    before = _state(s)
    s.update(x * 10)
    assert all(torch.equal(v, before[k]) for k, v in s.state_dict().items())
    s.reset()
    _assert_same_state(s, RunningQuantiles(3).freeze())
    s.unfreeze()
    s.update(x)
    fresh = RunningQuantiles(3)
    fresh.update(x)
    _assert_same_state(s, fresh)


def test_meta_device_flow() -> None:
    with torch.device("meta"):
        s = RunningQuantiles(3, relative_accuracy=0.02)
    s.to_empty(device="cpu")
    s.reset_parameters()
    x = _data("normal", n=500)
    s.update(torch.from_numpy(x))
    _assert_same_state(s, _sketch_of(x, relative_accuracy=0.02))


def test_dtype_is_pinned_and_integer_inputs_work() -> None:
    s = RunningQuantiles(2, accumulator_dtype=torch.float32).half()
    assert s.min.dtype == torch.float32 and s.counts.dtype == torch.int64
    s.update(torch.tensor([[1, 2], [3, 4], [5, 6]]))
    s.update(torch.tensor([[7.0, 8.0]], dtype=torch.bfloat16))
    assert s.quantile(1.0).tolist() == [7.0, 8.0] and s.count.item() == 4


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip() -> None:
    x = _data("cauchy", n=2000)
    s = _sketch_of(x, chunks=2)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    loaded = RunningQuantiles(3)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    _assert_same_state(loaded, s)
    assert torch.equal(loaded.quantile(torch.tensor(QS)), s.quantile(torch.tensor(QS)))
    more = torch.from_numpy(_data("normal", n=300, seed=9))
    s.update(more), loaded.update(more)
    _assert_same_state(loaded, s)  # and they stay equal


@pytest.mark.parametrize("fault", ["negative", "total", "accuracy", "min_above_max", "shape"])
def test_a_bad_state_is_refused_whole(fault: str) -> None:
    src = _sketch_of(_data("normal", n=200))
    target = _sketch_of(_data("lognormal", n=50, seed=5))
    before = _state(target)
    state = _state(src)
    if fault == "negative":
        state["counts"][0, 5] = -1
        state["counts"][0, 6] += 1  # the totals still add up
        match = "non-negative"
    elif fault == "total":
        state["counts"][1, 3000] += 1
        match = "add up to"
    elif fault == "accuracy":
        state["accuracy"].fill_(0.02)
        match = re.escape("relative_accuracy=0.02")
    elif fault == "min_above_max":
        state["min"][2] = state["max"][2] + 1
        match = "must not exceed"
    else:
        state["counts"] = state["counts"][:, :-2]
        match = "size mismatch"
    with pytest.raises(CheckpointMismatchError, match=match):
        target.load_state_dict(state)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ bad input
def test_wrong_trailing_shape_names_the_stat() -> None:
    s = RunningQuantiles((2, 3))
    with pytest.raises(ValueError, match=r"RunningQuantiles: expected input whose trailing "
                                         r"shape is \(2, 3\) \(got shape \(4, 3, 2\)\)"):
        s.update(torch.zeros(4, 3, 2))


def test_nan_policies() -> None:
    x = torch.from_numpy(_data("normal", n=200))
    bad = x.clone()
    bad[[3, 50], 1] = math.nan
    bad[7, 0] = math.inf

    raising = _sketch_of(x[:20].numpy())
    before = _state(raising)
    with pytest.raises(ValueError, match="RunningQuantiles: input contains NaN or Inf"):
        raising.update(bad)
    for k, v in raising.state_dict().items():
        assert torch.equal(v, before[k]), k

    skipping = RunningQuantiles(3, nan_policy="skip")
    skipping.update(bad)
    keep = torch.isfinite(bad).all(1)
    clean = RunningQuantiles(3, nan_policy="skip")
    clean.update(bad[keep])
    assert skipping.n_skipped.item() == 3 and skipping.count.item() == 197
    assert torch.equal(skipping.counts, clean.counts)
    _assert_within(skipping.quantile(torch.tensor(QS)).numpy(),
                   _reference(bad[keep].numpy(), QS), 0.01)

    propagating = RunningQuantiles(3, nan_policy="propagate")
    propagating.update(bad)
    q = propagating.quantile(0.5)
    assert math.isnan(q[1].item()) and propagating.count.item() == 200
    assert propagating.max[0].item() == math.inf


# ------------------------------------------------------------------ torch.compile
class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.skip = RunningQuantiles(4, nan_policy="skip")
        self.propagate = RunningQuantiles(4, nan_policy="propagate")
        self.norm = QuantileNorm(4, clip=5.0, nan_policy="skip")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.skip.update(x)
        self.propagate.update(x)
        return self.norm(x) + self.skip.quantile(0.5)


def test_compiled_update_equals_eager() -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 4, generator=g) * 3 for _ in range(6)]
    batches[3][2, 1] = math.nan
    eager, model = _Model(), _Model()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    ys = [(compiled(x), eager(x)) for x in batches[:2]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        ys += [(compiled(x), eager(x)) for x in batches[2:]]
    for y, ref in ys:
        torch.testing.assert_close(y, ref, equal_nan=True, rtol=1e-4, atol=1e-4)
    a, b = model.state_dict(), eager.state_dict()
    for key in a:
        if key.endswith("counts"):
            # Inductor's log may round a value sitting on a bucket edge the other way: the
            # totals agree and the cumulative counts differ by at most a value or two.
            assert torch.equal(a[key].sum(-1), b[key].sum(-1)), key
            assert (a[key].cumsum(-1) - b[key].cumsum(-1)).abs().max() <= 2, key
        else:
            torch.testing.assert_close(a[key], b[key], equal_nan=True, msg=key)
    assert model.skip.n_skipped.item() == 1 and model.skip.count.item() == 95


# ------------------------------------------------------------------ distributed
ROWS = {1: [3001], 2: [0, 2500], 3: [7, 0, 4100]}


def _rank_rows(world: int, rank: int) -> np.ndarray:
    x = _data("span", n=sum(ROWS[world]), seed=world)
    start = sum(ROWS[world][:rank])
    return x[start : start + ROWS[world][rank]]


def _sync_body(rank: int, world: int) -> dict[str, object]:
    s = RunningQuantiles(3)
    mine = _rank_rows(world, rank)
    half = len(mine) // 2
    s.update(torch.from_numpy(mine[:half]))
    first = sync_stats({"q": s})
    again = _state(s)
    sync_stats({"q": s})  # nothing new: nothing changes
    unchanged = all(torch.equal(v, again[k]) for k, v in s.state_dict().items())
    s.update(torch.from_numpy(mine[half:]))  # data after a sync is merged once
    sync_stats({"q": s})
    return {"state": _state(s), "collectives": first.n_collectives, "unchanged": unchanged}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sync_equals_the_single_process_sketch_bit_for_bit(world: int) -> None:
    results = run_distributed(_sync_body, world)
    union = _sketch_of(np.concatenate([_rank_rows(world, r) for r in range(world)]))
    expected = union.state_dict()
    for res in results:
        assert res["unchanged"] and res["collectives"] <= 4
        state = res["state"]
        assert state.keys() == expected.keys()
        for key in expected:
            assert torch.equal(state[key], expected[key]), key


def _collectives_body(rank: int, world: int) -> tuple[int, int]:
    from statplug import RunningMoments

    g = torch.Generator().manual_seed(rank)
    moments = {f"m{i}": RunningMoments(16) for i in range(8)}
    sketches = {f"q{i}": RunningQuantiles(16, max_buckets=256) for i in range(8)}
    for stat in [*moments.values(), *sketches.values()]:
        stat.update(torch.randn(10 + rank, 16, generator=g))
    alone = sync_stats(moments).n_collectives
    for stat in moments.values():
        stat.update(torch.randn(3, 16, generator=g))
    return alone, sync_stats({**moments, **sketches}).n_collectives


@pytest.mark.slow
def test_sketches_cost_at_most_two_more_collectives() -> None:
    """Sketches travel in the SUM and MAX buckets every sync already has."""
    for alone, with_sketches in run_distributed(_collectives_body, 2):
        assert with_sketches <= alone + 2 and with_sketches <= 4


# ------------------------------------------------------------------ QuantileNorm
def test_quantile_norm_maps_the_quantiles_to_plus_minus_one() -> None:
    x = _data("lognormal", n=5000, seed=4)
    norm = QuantileNorm(3)
    for part in np.array_split(x, 5):
        norm(torch.from_numpy(part))
    norm.eval()
    lo, hi = _reference(x, np.array([0.01, 0.99]))
    y = norm(torch.from_numpy(x)).double().numpy()
    y_ref = 2 * (x - lo) / (hi - lo) - 1
    # Each quantile is within 1% of numpy's: y moves by at most that much of the range.
    tol = 2 * 0.01 * (np.abs(lo) + np.abs(hi)) / (hi - lo) * (1 + ROUNDING) * (1 + np.abs(y_ref))
    assert (np.abs(y - y_ref) <= tol + 1e-5).all()
    q = norm.sketch.quantile(torch.tensor([0.01, 0.99])).float()
    torch.testing.assert_close(norm(q), torch.tensor([[-1.0] * 3, [1.0] * 3]))
    back = norm.inverse(norm(torch.from_numpy(x)))
    # float32 y: the round trip is exact up to float32 rounding of the range.
    torch.testing.assert_close(back, torch.from_numpy(x), rtol=1e-5, atol=1e-6 * float(hi.max()))


def test_quantile_norm_identity_clip_freeze_and_eval() -> None:
    norm = QuantileNorm(2, clip=1.5)
    one = torch.tensor([[3.0, -4.0]])
    assert torch.equal(norm(one), one)  # one sample seen: identity, never clipped
    x = torch.from_numpy(_data("normal", n=1000, f=2))
    norm(x)
    y = norm(x * 100)
    assert y.abs().max().item() == 1.5
    norm.eval()
    norm(x * 7)
    norm.train().freeze()
    before = _state(norm)
    norm(x * 9)
    assert all(torch.equal(v, before[k]) for k, v in norm.state_dict().items())
    assert norm.frozen and norm.count.item() == 2001
    const = QuantileNorm(1)
    const(torch.full((10, 1), 2.5))
    const.eval()
    assert const(torch.tensor([[2.5], [7.0]])).flatten().tolist() == [0.0, 0.0]
    assert const.inverse(torch.tensor([[0.3]])).item() == 2.5
