"""sync_stats across real gloo processes: exactness, idempotence, coalescing, layout errors, DDP."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from torch import nn

from statplug import (
    EMAMoments,
    RunningMinMax,
    RunningMoments,
    RunningNorm,
    StatLayoutError,
    exclude_from_ddp_broadcast,
    sync_stats,
)
from statplug.distributed import broadcast_stats

pytestmark = pytest.mark.slow

DTYPE = torch.float64

# Rows per rank; one rank sees no sample at all.
ROWS = {2: [0, 1037], 3: [5, 0, 4100]}


def _rank_data(rank: int, world: int, seed: int = 0) -> np.ndarray:
    """float64 data, so the per-batch kernel is exact and any error would be the merge's."""
    rng = np.random.default_rng(seed + rank)
    n = ROWS[world][rank]
    # Each rank's data comes from another distribution, so a wrong merge cannot hide.
    return rng.normal(10.0 * rank + 1e3, 1.0 + rank, size=(n, 3))


class _Stats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moments = RunningMoments(3)
        self.moments64 = RunningMoments(3, accumulator_dtype=torch.float64)
        self.minmax = RunningMinMax(3)
        self.norm = RunningNorm(3)


def _feed(model: _Stats, x: np.ndarray) -> None:
    t = torch.from_numpy(x).to(DTYPE)
    for chunk in (t[: len(t) // 3], t[len(t) // 3 :]):
        model.moments.update(chunk)
        model.moments64.update(chunk)
        model.minmax.update(chunk)
        model.norm.moments.update(chunk)


def _summary(model: _Stats) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _exact_body(rank: int, world: int) -> dict:
    model = _Stats()
    _feed(model, _rank_data(rank, world))
    report = sync_stats(model)
    first = _summary(model)
    report2 = sync_stats(model)  # idempotent: nothing new to merge
    return {"first": first, "second": _summary(model), "n_coll": report.n_collectives,
            "n_coll2": report2.n_collectives, "n_stats": report.n_stats}


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_ranks_match_single_process_float64(world):
    results = run_distributed(_exact_body, world)
    data = np.concatenate([_rank_data(r, world) for r in range(world)]).astype(np.float64)
    mean, var = data.mean(0), data.var(0)
    for res in results:
        s = res["first"]
        assert res["n_stats"] == 4
        assert res["n_coll"] <= 4
        assert s["moments.count"].item() == len(data)
        # float32 accumulators hold float32 state (mean 1e3: half an ulp is 3e-5), so the
        # variance is good to ~eps * mean / std; float64 ones are checked tighter below.
        for prefix in ("moments", "moments64", "norm.moments"):
            np.testing.assert_allclose(s[f"{prefix}.mean"].double().numpy(), mean, rtol=1e-6)
            np.testing.assert_allclose(
                (s[f"{prefix}.m2"].double() / len(data)).numpy(), var, rtol=1e-5
            )
        np.testing.assert_array_equal(s["minmax.min"].numpy(), data.min(0).astype(np.float32))
        np.testing.assert_array_equal(s["minmax.max"].numpy(), data.max(0).astype(np.float32))
        # The float64 accumulator is exact to float64 rounding.
        np.testing.assert_allclose(s["moments64.mean"].numpy(), mean, rtol=1e-12)
        np.testing.assert_allclose((s["moments64.m2"] / len(data)).numpy(), var, rtol=1e-10)
        # Syncing again changes nothing.
        for key, value in s.items():
            torch.testing.assert_close(res["second"][key], value, rtol=0, atol=0)
    # Every rank holds the same global stats.
    for res in results[1:]:
        for key, value in results[0]["first"].items():
            torch.testing.assert_close(res["first"][key], value, rtol=0, atol=0)


def _float32_body(rank: int, world: int) -> dict:
    stat = RunningMoments(3)
    for x in _chunks(rank, world):
        stat.update(x)
    sync_stats(stat)
    return {k: v.clone() for k, v in stat.state_dict().items()}


def _chunks(rank: int, world: int) -> list[torch.Tensor]:
    t = torch.from_numpy(_rank_data(rank, world)).float()
    return [t[: len(t) // 3], t[len(t) // 3 :]]


def test_float32_sync_equals_single_process_over_the_same_batches():
    """With float32 inputs the sync adds no error to what one process computes from them."""
    world = 3
    single = RunningMoments(3)
    for r in range(world):
        for x in _chunks(r, world):
            single.update(x)
    for s in run_distributed(_float32_body, world):
        assert s["count"].item() == single.count.item()
        torch.testing.assert_close(s["mean"], single.mean, rtol=1e-7, atol=0)
        torch.testing.assert_close(s["m2"], single.m2, rtol=1e-6, atol=0)


def _two_rounds_data(world: int) -> np.ndarray:
    """Every rank's data of both rounds (seeds 0 and 100), concatenated, float64."""
    return np.concatenate(
        [_rank_data(r, world, s) for s in (0, 100) for r in range(world)]
    ).astype(np.float64)


def _incremental_body(rank: int, world: int) -> dict:
    model = _Stats()
    _feed(model, _rank_data(rank, world, seed=0))
    sync_stats(model)
    _feed(model, _rank_data(rank, world, seed=100))
    sync_stats(model)
    return _summary(model)


def test_update_sync_update_sync_counts_each_sample_once():
    world = 3
    results = run_distributed(_incremental_body, world)
    data = _two_rounds_data(world)
    for s in results:
        assert s["moments.count"].item() == len(data)
        np.testing.assert_allclose(s["moments64.mean"].numpy(), data.mean(0), rtol=1e-9)
        np.testing.assert_allclose((s["moments64.m2"] / len(data)).numpy(), data.var(0), rtol=1e-9)
        np.testing.assert_array_equal(s["minmax.max"].numpy(), data.max(0).astype(np.float32))


def _loaded_body(rank: int, world: int, blob: bytes) -> dict:
    model = _Stats()
    model.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
    sync_stats(model)
    return _summary(model)


def test_checkpoint_loaded_on_three_ranks_counts_once():
    source = _Stats()
    _feed(source, _rank_data(2, 3))
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    expected = _summary(source)
    results = run_distributed(_loaded_body, 3, buf.getvalue())
    for s in results:
        for key, value in expected.items():
            torch.testing.assert_close(s[key], value, rtol=0, atol=0)


class _CountingCollectives:
    """Counts torch.distributed collective calls while letting every call through."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
             "all_gather_object", "broadcast_object_list", "reduce_scatter", "barrier")

    def __init__(self) -> None:
        self.calls = 0
        self._saved: dict = {}

    def __enter__(self) -> _CountingCollectives:
        for name in self.NAMES:
            fn = getattr(dist, name)
            self._saved[name] = fn

            def counted(*args, _fn=fn, **kwargs):
                self.calls += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _count_body(rank: int, world: int) -> dict:
    torch.manual_seed(rank)
    out = {}
    kinds = {"moments": (RunningMoments,), "mixed": (RunningMoments, RunningMinMax, EMAMoments)}
    for kind, classes in kinds.items():
        for k in (1 if kind == "moments" else 3, 200):
            stats = [classes[i % len(classes)](4) for i in range(k)]
            # Data far from 0 against its spread: the first sync needs the second phase; the
            # next, centred on the agreed mean, does not.
            for sync in ("first", "next"):
                for s in stats:
                    s.update(torch.randn(3 + rank, 4) + 100.0)
                with _CountingCollectives() as counter:
                    report = sync_stats(stats)
                out[kind, k, sync] = (counter.calls, report.n_collectives, report.n_bytes)
    return out


def test_collective_count_is_constant_in_the_number_of_stats():
    for res in run_distributed(_count_body, 2):
        for kind, few in (("moments", 1), ("mixed", 3)):
            for sync in ("first", "next"):
                calls_few, reported_few, bytes_few = res[kind, few, sync]
                calls_200, reported_200, bytes_200 = res[kind, 200, sync]
                assert calls_few == calls_200 == reported_few == reported_200, (kind, sync)
                assert calls_200 <= 4
                assert bytes_200 > bytes_few
        # fingerprint + one SUM (+ the second phase on the first sync of far-off data)
        assert res["moments", 200, "first"][0] == 3
        assert res["moments", 200, "next"][0] == 2
        # + a MAX for min/max; EMAMoments always takes the second phase
        assert res["mixed", 200, "next"][0] == 4


def _payload_body(rank: int, world: int, features: int) -> int:
    stat = RunningMoments(features)
    for _ in range(2):  # the second sync is centred on the agreed mean: one phase
        stat.update(torch.randn(64 + rank, features))
        report = sync_stats(stat)
    assert report.n_collectives == 2  # the layout check and one SUM
    return report.n_bytes


def test_one_big_stat_sends_two_values_per_feature():
    """A stat's count travels once per stat (per chunk of features), not once per feature: the
    payload of a moments sync is the new data's two sums per feature, plus a few values."""
    features = 100_000
    for n_bytes in run_distributed(_payload_body, 2, features):
        assert 2 * 8 * features <= n_bytes <= 2 * 8 * features + 8 * 64, n_bytes


class _ManyShapes(nn.Module):
    """Stats a sync works on in pieces when pieces hold at most 5 features: ranges of one
    stat's features (13 = 5 + 5 + 3, weighted, float32, EMA) and runs of small stats."""

    def __init__(self) -> None:
        super().__init__()
        self.big = RunningMoments(13, accumulator_dtype=DTYPE)
        self.a = RunningMoments(2, accumulator_dtype=DTYPE)
        self.b = RunningMoments(2, accumulator_dtype=DTYPE)
        self.c = RunningMoments(2, accumulator_dtype=DTYPE)
        self.weighted = RunningMoments(7, accumulator_dtype=DTYPE, weighted=True)
        self.f32 = RunningMoments(12)
        self.ema = EMAMoments(11, momentum=0.3, accumulator_dtype=DTYPE)
        self.minmax = RunningMinMax(6)


def _pieces_data(rank: int, round_: int, features: int) -> np.ndarray:
    rows = (ROWS[3][rank], 7 + 5 * rank)[round_]  # the first round leaves rank 1 empty
    rng = np.random.default_rng(100 * round_ + 10 * rank + features)
    return rng.normal(1e3 + 5.0 * rank + round_, 1.0 + rank, size=(rows, features))


def _pieces_body(rank: int, world: int, piece: int | None) -> dict:
    import statplug.distributed.sync as sync_module

    if piece is not None:
        sync_module._PIECE = piece
    model = _ManyShapes()
    out: dict = {"collectives": []}
    for round_ in range(2):
        for name, stat in model.named_children():
            x = torch.from_numpy(_pieces_data(rank, round_, stat.shape[0]))
            if name == "weighted":
                stat.update(x, weight=torch.linspace(0.5, 2.0, len(x), dtype=DTYPE))
            elif len(x):
                stat.update(x)
        out["collectives"].append(sync_stats(model).n_collectives)
        out[round_] = _summary(model)
    return out


def test_stats_worked_on_in_pieces_sync_as_if_whole():
    """Pieces of 5 features (ranges of a stat, runs of stats) give the results of whole
    batches, the single-process float64 results, with no more collectives."""
    whole = run_distributed(_pieces_body, 3, None)
    cut = run_distributed(_pieces_body, 3, 5)
    for res in whole + cut:
        assert all(n <= 4 for n in res["collectives"]), res["collectives"]
        for key, value in whole[0][1].items():
            torch.testing.assert_close(res[1][key], value, rtol=1e-12, atol=0)
    final = whole[0][1]
    for name, features in (("big", 13), ("a", 2), ("f32", 12)):
        data = np.concatenate([_pieces_data(r, k, features) for k in range(2) for r in range(3)])
        tol = 1e-12 if name != "f32" else 1e-6
        assert final[f"{name}.count"].item() == len(data)
        np.testing.assert_allclose(final[f"{name}.mean"].double().numpy(), data.mean(0), rtol=tol)
        np.testing.assert_allclose(
            final[f"{name}.m2"].double().numpy() / len(data), data.var(0), rtol=100 * tol
        )


def _mismatch_body(rank: int, world: int) -> str:
    stats = nn.Module()
    stats.a = RunningMoments(3)
    # Rank 1 builds a different second stat: another shape.
    stats.b = RunningMoments(4 if rank == 0 else 5)
    stats.c = RunningMinMax(2)
    start = time.monotonic()
    try:
        sync_stats(stats)
    except StatLayoutError as err:
        assert time.monotonic() - start < 10
        return str(err)
    return "no error"


def test_layout_mismatch_raises_on_every_rank():
    messages = run_distributed(_mismatch_body, 2, timeout=60)
    for msg in messages:
        assert "stat #1" in msg
        assert "'b'" in msg or " b RunningMoments" in msg


class _DDPModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.moments = RunningMoments(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.moments.update(x)
        return self.lin(x)


def _ddp_body(rank: int, world: int, exclude: bool) -> dict:
    torch.manual_seed(0)
    model = _DDPModel()
    if exclude:
        exclude_from_ddp_broadcast(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    for step in range(3):
        x = torch.full((4, 2), float(rank * 10 + step))
        ddp(x).sum().backward()
    result = {"count": model.moments.count.item(), "mean": model.moments.mean.tolist()}
    # Tear DDP down (its reducer holds the process group) before the group is destroyed.
    del ddp
    dist.barrier()
    return result


def test_plain_ddp_keeps_local_stats_only_with_exclusion():
    kept = run_distributed(_ddp_body, 2, True)
    # Each rank keeps its own data: rank r saw values 10r, 10r+1, 10r+2.
    assert kept[0] == {"count": 12, "mean": [1.0, 1.0]}
    assert kept[1] == {"count": 12, "mean": [11.0, 11.0]}
    clobbered = run_distributed(_ddp_body, 2, False)
    # Without it DDP copies rank 0's buffers over rank 1's before each forward.
    assert clobbered[0] == kept[0]
    assert clobbered[1] != kept[1]
    assert clobbered[1]["mean"][0] < 11.0


def test_no_process_group_is_a_noop():
    stat = RunningMoments(2)
    stat.update(torch.ones(3, 2))
    report = sync_stats(stat)
    assert (report.n_stats, report.n_collectives, report.n_bytes) == (1, 0, 0)
    assert stat.count.item() == 3


def _rebind_body(rank: int, world: int) -> dict:
    model = _Stats()
    _feed(model, _rank_data(rank, world, seed=0))
    sync_stats(model)
    # Rebind every buffer (as a device move does): the sync must notice and rebuild its arenas.
    model._apply(lambda t: t.clone())
    _feed(model, _rank_data(rank, world, seed=100))
    sync_stats(model)
    single = RunningMoments(3, accumulator_dtype=torch.float64)
    single.update(torch.randn(4, 3))
    sync_stats(single)  # a one-stat sync between ranks does not disturb the model's plan
    sd = model.moments64.state_dict()
    return {"state": _summary(model), "compact": all(t._base is None for t in sd.values())}


def test_sync_after_buffers_are_rebound_and_state_dict_is_compact():
    world = 2
    results = run_distributed(_rebind_body, world)
    data = _two_rounds_data(world)
    for res in results:
        s = res["state"]
        assert res["compact"]
        assert s["moments64.count"].item() == len(data)
        np.testing.assert_allclose(s["moments64.mean"].numpy(), data.mean(0), rtol=1e-12)
        np.testing.assert_allclose((s["moments64.m2"] / len(data)).numpy(), data.var(0), rtol=1e-10)


def test_docstring_examples_run():
    import doctest

    import statplug.distributed.ddp
    import statplug.distributed.sync

    for mod in (statplug.distributed.sync, statplug.distributed.ddp):
        assert doctest.testmod(mod).failed == 0, mod.__name__


def _broadcast_body(rank: int, world: int) -> dict:
    from statplug.distributed import broadcast_stats

    model = _Stats()
    _feed(model, _rank_data(0, 2))  # the same pre-existing data on every rank (one copy)
    if rank == 1:
        model.minmax.update(torch.full((1, 3), 1e9))  # a stray difference: rank 0 wins
    report = broadcast_stats(model)
    _feed(model, _rank_data(1, 2, seed=50 + rank))
    sync_stats(model)
    return {"state": _summary(model), "n_coll": report.n_collectives}


def test_broadcast_stats_makes_rank_0_state_the_agreed_base():
    results = run_distributed(_broadcast_body, 2)
    data = np.concatenate(
        [_rank_data(0, 2)] + [_rank_data(1, 2, seed=50 + r) for r in range(2)]
    ).astype(np.float64)
    for res in results:
        s = res["state"]
        assert res["n_coll"] <= 1 + 3 * 4  # a fingerprint, then one per state name and class
        assert s["moments64.count"].item() == len(data)
        np.testing.assert_allclose(s["moments64.mean"].numpy(), data.mean(0), rtol=1e-12)
        np.testing.assert_allclose((s["moments64.m2"] / len(data)).numpy(), data.var(0), rtol=1e-9)
        np.testing.assert_array_equal(s["minmax.max"].numpy(), data.max(0).astype(np.float32))


def _mixed_dtype_body(rank: int, world: int, which: str) -> dict:
    torch.manual_seed(rank)
    x = torch.randn(20 + 7 * rank, 4, dtype=torch.float64) + 3 * rank
    stats = nn.ModuleDict()
    for dtype in (torch.float32, torch.float64):
        key = str(dtype).split(".")[-1]
        if which in ("both", key):
            stats[f"ema_{key}"] = EMAMoments(4, momentum=0.3, accumulator_dtype=dtype)
            stats[f"mom_{key}"] = RunningMoments(4, accumulator_dtype=dtype)
    for stat in stats.values():
        stat.update(x)
    sync_stats(stats)
    return {k: v.clone() for k, v in stats.state_dict().items()}


def test_stats_of_one_class_with_different_accumulator_dtypes_sync_as_if_alone():
    both = run_distributed(_mixed_dtype_body, 2, "both")
    alone = {
        **run_distributed(_mixed_dtype_body, 2, "float32")[0],
        **run_distributed(_mixed_dtype_body, 2, "float64")[0],
    }
    for state in both:
        assert state.keys() == alone.keys()
        for key, value in alone.items():
            assert state[key].dtype == value.dtype, key
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def _centred_body(rank: int, world: int, diverge: bool) -> dict:
    """Three rounds of update + sync of data far from 0 (mean 1e4) drifting between rounds; with
    ``diverge`` rank 1's agreed state is tampered with first (its checksum then differs)."""
    model = nn.Module()
    model.m = RunningMoments(3, accumulator_dtype=torch.float64)
    reports = []
    for round_ in range(3):
        if diverge and round_ == 1 and rank == 1:
            model.m._agreed_mean.add_(1.0)  # as if this rank alone had loaded another checkpoint
        model.m.update(torch.from_numpy(_drift_data(rank, round_)))
        with _CountingCollectives() as counter:
            sync_stats(model)
        reports.append(counter.calls)
    return {"mean": model.m.mean.clone(), "m2": model.m.m2.clone(), "calls": reports,
            "count": model.m.count.item()}


def _drift_data(rank: int, round_: int) -> np.ndarray:
    rng = np.random.default_rng(10 * round_ + rank)
    return rng.normal(1e4 + 0.3 * round_, 1.0 + rank, size=(50 + 40 * rank, 3))


def test_syncs_centred_on_the_agreed_mean_match_float64_in_fewer_collectives():
    results = run_distributed(_centred_body, 2, False)
    data = np.concatenate([_drift_data(r, k) for k in range(3) for r in range(2)])
    for res in results:
        assert res["count"] == len(data)
        np.testing.assert_allclose(res["mean"].numpy(), data.mean(0), rtol=1e-13)
        np.testing.assert_allclose(res["m2"].numpy() / len(data), data.var(0), rtol=1e-11)
        # First sync: far from the empty base, so Chan's second phase; then one data collective.
        assert res["calls"] == [3, 2, 2]


def _tampered_body(rank: int, world: int) -> dict:
    """One sync agrees; then rank 1 alone changes its agreed state, as if it alone had loaded
    another checkpoint: the next sync must refuse on every rank, and change nothing."""
    model = nn.Module()
    model.m = RunningMoments(3, accumulator_dtype=torch.float64)
    model.m.update(torch.from_numpy(_drift_data(rank, 0)))
    sync_stats(model)
    if rank == 1:
        model.m._agreed_mean.add_(1.0)
    model.m.update(torch.from_numpy(_drift_data(rank, 1)))
    before = {k: v.clone() for k, v in model.m.state_dict().items()}
    try:
        sync_stats(model)
    except StatLayoutError as err:
        after = model.m.state_dict()
        unchanged = all(torch.equal(after[k], v) for k, v in before.items())
        return {"error": str(err), "unchanged": unchanged}
    return {"error": None}


def test_ranks_disagreeing_on_the_agreed_state_raise_on_every_rank():
    for res in run_distributed(_tampered_body, 2):
        assert res["error"] is not None and "broadcast_stats" in res["error"]
        assert "m" in res["error"] and "rank 0" in res["error"]
        assert res["unchanged"]


def _structured_divergence_body(rank: int, world: int) -> dict:
    """Rank 1 alone loaded a checkpoint (base mean [2, -1], count 10); rank 0 is fresh. A
    weighted sum of the bases with weights [1, 2] would not tell them apart. The sync refuses on
    every rank; after broadcast_stats from rank 1 both ranks agree and merge exactly."""
    m = RunningMoments(2, accumulator_dtype=torch.float64)
    if rank == 1:
        state = m.state_dict()
        state.update(count=torch.tensor(10), mean=torch.tensor([2.0, -1.0], dtype=torch.float64),
                     m2=torch.tensor([4.0, 4.0], dtype=torch.float64))
        m.load_state_dict(state)
    try:
        sync_stats(m)
        error = None
    except StatLayoutError as err:
        error = str(err)
    broadcast_stats(m, src=1)
    m.update(torch.from_numpy(_divergence_data(rank)))
    sync_stats(m)
    return {"error": error, "count": m.count.item(), "mean": m.mean.clone()}


def _divergence_data(rank: int) -> np.ndarray:
    return np.random.default_rng(rank).normal([5.0, 7.0], 1.0, size=(20 + 10 * rank, 2))


def test_ranks_that_loaded_different_checkpoints_raise_then_agree_after_a_broadcast():
    new = np.concatenate([_divergence_data(0), _divergence_data(1)])
    n_b, base = 10, np.array([2.0, -1.0])
    for res in run_distributed(_structured_divergence_body, 2):
        assert res["error"] is not None and "rank 0: 0, rank 1: 10" in res["error"]
        assert res["count"] == n_b + len(new)
        expect = (n_b * base + len(new) * new.mean(0)) / (n_b + len(new))
        np.testing.assert_allclose(res["mean"].numpy(), expect, rtol=1e-13)


def _reloaded_after_inf_body(rank: int, world: int) -> dict:
    m = RunningMoments(2, nan_policy="propagate")
    clean = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.ones(4, 2)
    if rank == 0:
        x[0, 0] = float("inf")
    m.update(x)
    sync_stats(m)  # the Inf reaches every rank, as propagate says
    m.load_state_dict(clean)  # both ranks recover from a clean checkpoint
    if rank == 1:
        m.update(torch.arange(16.0).view(8, 2))
    sync_stats(m)  # rank 0 has no new data: its old shift must not matter
    return {"count": m.count.item(), "mean": m.mean.clone()}


def test_a_rank_without_new_data_after_a_reload_contributes_nothing_not_nan():
    expect = torch.arange(16.0).view(8, 2).mean(0).double()
    for res in run_distributed(_reloaded_after_inf_body, 2):
        assert res["count"] == 8
        torch.testing.assert_close(res["mean"], expect)


def _first_sync_in_inference_mode_body(rank: int, world: int) -> dict:
    torch.manual_seed(rank)
    stats = nn.ModuleList([RunningMoments(3), RunningMinMax(3), EMAMoments(3)])
    xs = [torch.randn(8 + rank, 3) for _ in range(3)]
    for s in stats:
        s.update(xs[0])
    with torch.inference_mode():  # as in a Lightning validation hook
        sync_stats(stats)
    for x in xs[1:]:  # training updates afterwards write into the synced buffers
        for s in stats:
            s.update(x)
    sync_stats(stats)
    return {"count": stats[0].count.item(), "mean": stats[0].mean.clone(),
            "max": stats[1].max.clone(), "data": torch.cat(xs)}


def test_a_first_sync_in_inference_mode_leaves_stats_writable():
    results = run_distributed(_first_sync_in_inference_mode_body, 2)
    data = torch.cat([r["data"] for r in results]).double()
    for res in results:
        assert res["count"] == len(data)
        torch.testing.assert_close(res["mean"].double(), data.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res["max"].double(), data.max(0).values)


def test_layout_fingerprint_is_the_syncs_and_tells_layouts_apart() -> None:
    from statplug.distributed import describe_stat, layout_fingerprint

    a, b = RunningMoments(3), RunningMoments(3)
    assert layout_fingerprint([a]) == layout_fingerprint([b])
    assert layout_fingerprint([a]) != layout_fingerprint([RunningMoments(4)])
    assert layout_fingerprint([a]) != layout_fingerprint([RunningMinMax(3)])
    assert "RunningMoments(shape=(3,))" in describe_stat(a)


def _copy_in_copy_out_body(rank: int, world: int) -> dict:
    import copy
    import gc
    import weakref

    model = _Stats()
    _feed(model, _rank_data(rank, world))
    before = {n: (b.data_ptr(), b.untyped_storage().nbytes()) for n, b in model.named_buffers()}
    sync_stats(model)
    after = {n: (b.data_ptr(), b.untyped_storage().nbytes()) for n, b in model.named_buffers()}
    storages = [b.untyped_storage().data_ptr() for b in model.buffers()]
    twin = copy.deepcopy(model)
    extra = torch.from_numpy(_rank_data(rank, world, seed=7)).to(DTYPE)
    for m in (model, twin):
        m.moments64.update(extra)
        sync_stats(m)
    same = torch.equal(model.moments64.m2, twin.moments64.m2)
    ref = weakref.ref(model.moments)
    del model, twin
    gc.collect()
    return {"same_tensors": before == after, "own_storage": len(set(storages)) == len(storages),
            "twin_same": same, "freed": ref() is None}


def test_sync_copies_in_and_out_and_keeps_nothing():
    """A sync writes results into each buffer in place: no buffer is rebound, none shares
    storage with another (or with a tensor the sync owns), a deep copy syncs alike, and nothing
    keeps a deleted model's stats alive."""
    for res in run_distributed(_copy_in_copy_out_body, 2):
        assert res == {"same_tensors": True, "own_storage": True, "twin_same": True,
                       "freed": True}


def _threads_body(rank: int, world: int) -> str:
    torch.set_num_threads((1, 2)[rank])  # float sums of 100k values then differ in order
    stat = RunningMoments(100_000)
    g = torch.Generator().manual_seed(0)
    sd = stat.state_dict()
    sd["count"] = torch.tensor(64)
    sd["mean"] = torch.randn(100_000, generator=g) * 3 + 1
    sd["m2"] = torch.rand(100_000, generator=g) * 600
    stat.load_state_dict(sd)  # bit-identical agreed state on both ranks
    sync_stats([stat])
    return f"{int(stat.count)}"


def test_agreed_state_check_ignores_the_ranks_thread_counts():
    """Ranks holding bit-identical agreed states pass the check even when their intra-op thread
    counts (and so their float summation orders) differ: the check compares bit patterns."""
    assert run_distributed(_threads_body, 2) == ["64", "64"]
