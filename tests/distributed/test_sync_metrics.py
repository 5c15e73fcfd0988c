"""sync_metrics across real gloo processes, against torchmetrics' own distributed compute().

Each world size runs once (spawning processes and importing torchmetrics costs seconds): the body
does every scenario in turn and returns what it saw; the tests below check the parts.
Collectives are counted by wrapping ``torch.distributed``'s functions (they still run).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from torch import Tensor, nn

pytestmark = pytest.mark.slow

C = 4  # classes
# Samples per rank and round: uneven; CatMetric gets nothing on rank 0 in round 2.
ROWS = {2: [[37, 11], [6, 20], [9, 14]], 3: [[23, 5, 41], [7, 3, 12], [4, 18, 9]]}
ROUNDS = 3
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "all_gather_object", "broadcast", "broadcast_object_list", "barrier", "reduce", "gather",
    "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
    "send", "recv", "isend", "irecv",
)


@contextmanager
def counting() -> Iterator[list[int]]:
    """Count calls of torch.distributed's collectives (wrapped, still run) inside the block."""
    calls = [0]
    saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def wrap(fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _sum0(x: Tensor) -> Tensor:  # a custom reduce function: that metric falls back
    return torch.sum(x, dim=0)


def _metrics() -> nn.Module:
    """Every kind of state and route, MetricCollection (with compute groups) included."""
    from torchmetrics import (
        CatMetric,
        MaxMetric,
        MeanMetric,
        Metric,
        MetricCollection,
        MinMetric,
        SumMetric,
    )
    from torchmetrics.classification import (
        BinaryAUROC,
        MulticlassAccuracy,
        MulticlassF1Score,
        MulticlassPrecision,
    )

    class Odd(Metric):
        """States torchmetrics' stock metrics rarely have: NaN extrema, integer max, a mean
        state, bool/int32/huge int64 sums, a None state, a 2-D list state."""

        full_state_update = False

        def __init__(self) -> None:
            super().__init__()
            self.add_state("hi", torch.full((3,), -math.inf), dist_reduce_fx="max")
            self.add_state("lo", torch.full((3,), math.inf), dist_reduce_fx="min")
            self.add_state("peak", torch.tensor(0), dist_reduce_fx="max")  # int64
            self.add_state("avg", torch.zeros(2), dist_reduce_fx="mean")
            self.add_state("flags", torch.zeros(4, dtype=torch.bool), dist_reduce_fx="sum")
            self.add_state("n32", torch.zeros((), dtype=torch.int32), dist_reduce_fx="sum")
            self.add_state("big", torch.tensor(0), dist_reduce_fx="sum")
            self.add_state("raw", torch.zeros(2, dtype=torch.float64), dist_reduce_fx=None)
            self.add_state("rows", [], dist_reduce_fx="cat")

        def update(self, x: Tensor, rank: int) -> None:
            n = len(x)
            x = torch.nn.functional.pad(x, (0, 4))  # batches may be shorter than 4
            self.hi = torch.maximum(self.hi, x[:3])
            self.lo = torch.minimum(self.lo, x[:3])
            if rank == 1:  # NaN on one rank: torch's max/min over ranks propagate it
                self.hi[0] = math.nan
                self.lo[2] = math.nan
            self.peak = torch.maximum(self.peak, torch.tensor(2**60 + 7 * rank + n))
            self.avg += x[:2]
            self.flags |= x[:4] > 0
            self.n32 += n
            self.big += 2**55 + 3 * n  # past 2**53: float64 would round it
            self.raw += x[:2].double()
            self.rows.append(x[: n // 2 * 2].reshape(-1, 2))

        def compute(self) -> dict[str, Tensor]:
            from torchmetrics.utilities import dim_zero_cat

            out = {n: getattr(self, n) for n in self._defaults if n != "rows"}
            out["rows"] = dim_zero_cat(self.rows)
            return out

    class Custom(Metric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("total", torch.zeros(2), dist_reduce_fx=_sum0)

        def update(self, x: Tensor) -> None:
            self.total += x[:2]

        def compute(self) -> Tensor:
            return self.total

    class Metrics(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mean = MeanMetric()
            self.total = SumMetric()
            self.top = MaxMetric()
            self.bottom = MinMetric()
            self.acc = MulticlassAccuracy(C)
            self.f1 = MulticlassF1Score(C, average="macro")
            self.auroc = BinaryAUROC()  # no thresholds: list states
            self.cat = CatMetric()
            self.coll = MetricCollection(
                {"micro": MulticlassAccuracy(C, average="micro"),
                 "prec": MulticlassPrecision(C, average="weighted")},
                prefix="c_",
            )
            self.odd = Odd()

        def update(self, x: Tensor, logits: Tensor, target: Tensor, rank: int, cat: bool) -> None:
            # Dyadic values: sums are exact whatever the order, so equality is exact.
            v = torch.round(x * 8) / 8
            self.mean.update(v, weight=torch.ones_like(v) * 2)
            self.total.update(v)
            self.top.update(v)
            self.bottom.update(v)
            self.acc.update(logits, target)
            self.f1.update(logits, target)
            self.auroc.update(torch.sigmoid(x), (target % 2))
            if cat:
                self.cat.update(v)
            self.coll.update(logits, target)
            self.odd.update(x, rank)

        def compute(self) -> dict[str, Any]:
            out = {n: getattr(self, n).compute()
                   for n in ("mean", "total", "top", "bottom", "acc", "f1", "auroc", "cat", "odd")}
            out.update(self.coll.compute())
            return out

    Metrics.Custom = Custom  # type: ignore[attr-defined]
    return Metrics()


def _batches(rank: int, world: int, round_: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1000 * world + 10 * rank + round_)
    n = ROWS[world][round_][rank]
    x = torch.randn(n, generator=g) * 3 + rank
    logits = torch.randn(n, C, generator=g)
    target = torch.randint(0, C, (n,), generator=g)
    cut = max(1, n // (rank + 2))  # uneven batch counts and sizes
    return [(x[i : i + cut], logits[i : i + cut], target[i : i + cut]) for i in range(0, n, cut)]


def _states(module: nn.Module) -> dict[str, Any]:
    """Every metric state (lists as lists), cloned, and the sync flags."""
    out: dict[str, Any] = {}
    for name, m in module.named_modules():
        if hasattr(m, "_defaults"):
            for attr in m._defaults:
                v = getattr(m, attr)
                out[f"{name}.{attr}"] = [t.clone() for t in v] if isinstance(v, list) else v.clone()
            out[f"{name}._flags"] = (m._is_synced, m._cache is None, m._to_sync, m._should_unsync)
    return out


def _cycles(rank: int, world: int) -> list[dict[str, Any]]:
    """Update/sync/compute/reset cycles: ours (sync_metrics) against torchmetrics' own."""
    from statplug import sync_metrics

    ours = _metrics()
    ref = copy.deepcopy(ours)
    out = []
    for round_ in range(ROUNDS):
        for x, logits, target in _batches(rank, world, round_):
            for m in (ours, ref):
                m.update(x, logits, target, rank, cat=not (round_ == 2 and rank == 0))
        local = _states(ours)
        with counting() as n_ours, sync_metrics(ours) as report:
            got = ours.compute()
        after = _states(ours)
        with counting() as n_cached:
            cached = ours.top.compute()  # cached inside: no collective, the global value
        with counting() as n_ref:
            want = ref.compute()
        out.append({"got": got, "want": want, "n": n_ours[0], "n_ref": n_ref[0],
                    "report": report, "local": local, "after": after,
                    "cached": cached, "n_cached": n_cached[0]})
        if round_ == 1:  # reset between cycles: both start again from empty states
            for m in (ours, ref):
                for sub in m.modules():
                    if hasattr(sub, "_defaults"):
                        sub.reset()
    return out


def _combined(rank: int, world: int) -> dict[str, Any]:
    """Stats and metrics synced together equal each synced alone."""
    from torchmetrics import CatMetric, SumMetric

    from statplug import RunningMinMax, RunningMoments, sync_metrics, sync_stats

    torch.manual_seed(rank)
    stats = nn.ModuleList([RunningMoments(3), RunningMinMax(2)])
    for s in stats:
        s.update(torch.randn(50 + 13 * rank, s.shape[0]) + 1e4)
    stats_ref = copy.deepcopy(stats)
    metrics = [SumMetric(), CatMetric()]
    ref_metrics = copy.deepcopy(metrics)
    for m in metrics + ref_metrics:
        m.update(torch.arange(3.0 + rank))
    out: dict[str, Any] = {}
    for phase in ("first", "second"):
        with counting() as n, sync_metrics(metrics, stats=stats) as report:
            got = [m.compute() for m in metrics]
        stats_report = sync_stats(stats_ref)
        out[phase] = {
            "n": n[0], "report": report, "got": got, "want": [m.compute() for m in ref_metrics],
            "stats": [s.state_dict() for s in stats],
            "stats_ref": [s.state_dict() for s in stats_ref],
            "stats_n": stats_report.n_collectives,
        }
        for m in metrics + ref_metrics:
            m.update(torch.tensor([0.5 * rank]))
        for s, r in zip(stats, stats_ref, strict=True):
            x = torch.randn(7, s.shape[0]) + 1e4
            s.update(x)
            r.update(x)
    return out


def _special(rank: int, world: int) -> dict[str, Any]:
    """A fallback metric, sync_on_compute=False, a metric with a process group of its own,
    compute_on_cpu."""
    from torchmetrics import CatMetric, SumMetric

    from statplug import StatplugError, sync_metrics

    models = _metrics()
    custom, custom_ref = models.Custom(), models.Custom()  # type: ignore[attr-defined]
    local_only = SumMetric(sync_on_compute=False)
    pair = dist.new_group([0, 1])  # every rank creates it; ranks 0 and 1 are in it
    own, own_ref = SumMetric(process_group=pair), SumMetric(process_group=pair)
    for m in (custom, custom_ref):
        m.update(torch.tensor([1.0 + rank, 2.0]))
    for m in (local_only, own, own_ref):
        m.update(torch.tensor([10.0**rank]))
    on_cpu, on_cpu_ref = CatMetric(compute_on_cpu=True), CatMetric(compute_on_cpu=True)
    for m in (on_cpu, on_cpu_ref):
        m.update(torch.arange(2.0 + rank))
    metrics = {"custom": custom, "local": local_only, "own": own, "cpu": on_cpu}
    with counting() as n, sync_metrics(metrics) as rep:
        got = {name: m.compute() for name, m in metrics.items()}
    cpu_restored = isinstance(on_cpu.value, list) and len(on_cpu.value) == 1
    with counting() as n_custom:
        want_custom = custom_ref.compute()
    want_own = own_ref.compute() if rank < 2 else None  # torchmetrics needs every rank in it
    nested = ""
    with sync_metrics([custom_ref]):
        try:  # refused before any collective: the outer block's local state would be lost
            with sync_metrics([custom_ref]):
                pass
        except StatplugError as err:
            nested = str(err)
    return {"got": got, "custom": want_custom, "n_custom": n_custom[0], "own": want_own,
            "report": rep, "n": n[0], "nested": nested, "cpu": on_cpu_ref.compute(),
            "cpu_restored": cpu_restored}


def _mismatch(rank: int, world: int) -> dict[str, str]:
    """Layouts that differ across ranks raise StatLayoutError on every rank (no hang)."""
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    from statplug import RunningMoments, StatLayoutError, sync_metrics

    out = {}
    metrics = {"mean": MeanMetric(), "acc": MulticlassAccuracy(C + (rank == world - 1))}
    cases: dict[str, dict[str, Any]] = {
        "metrics": {"metrics": metrics},
        "stats": {"metrics": {"mean": MeanMetric()},
                  "stats": [RunningMoments(2)] if rank == 0 else None},
    }
    for case, kwargs in cases.items():
        try:
            with sync_metrics(**kwargs):
                pass
        except StatLayoutError as err:
            out[case] = str(err)
        for m in kwargs["metrics"].values():  # nothing left half synced
            assert m._to_sync and not m._is_synced and m._cache is None
    return out


def _nothing(rank: int, world: int) -> dict[str, Any]:
    """Nothing to sync is a no-op (on every rank); metrics on one rank only raise, no hang."""
    from torchmetrics import SumMetric

    from statplug import RunningMoments, StatLayoutError, sync_metrics

    plain = nn.Sequential(nn.Linear(2, 2))
    stat = RunningMoments(2)
    stat.update(torch.full((3 + rank, 2), float(rank)))
    out: dict[str, Any] = {}
    for case, metrics, stats in (("dict", {}, None), ("list", [], None), ("model", plain, None),
                                 ("with_stats", {}, [stat])):
        with counting() as n, sync_metrics(metrics, stats=stats) as report:
            pass
        out[case] = (report.n_metrics, report.n_stats, n[0] == report.n_collectives)
    out["stat"] = (int(stat.count), stat.mean.tolist())
    lonely = {"sum": SumMetric()} if rank == 0 else {}
    try:
        with sync_metrics(lonely):
            pass
    except StatLayoutError as err:
        out["lonely"] = str(err)
    return out


def _body(rank: int, world: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    return {"cycles": _cycles(rank, world), "combined": _combined(rank, world),
            "special": _special(rank, world), "mismatch": _mismatch(rank, world),
            "nothing": _nothing(rank, world)}


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def runs(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    return request.param, run_distributed(_body, request.param, timeout=180)


def _assert_same(got: Any, want: Any, where: str, *, exact: bool = True) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}", exact=exact)
        return
    if exact:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=where)
    else:
        torch.testing.assert_close(got, want, equal_nan=True, msg=where)


def test_compute_equals_torchmetrics_distributed_compute(runs):
    world, results = runs
    for rank, res in enumerate(results):
        for round_, cycle in enumerate(res["cycles"]):
            got, want = dict(cycle["got"]), dict(cycle["want"])
            # A float mean over ranks: float64 sum / world rounded once, where torchmetrics
            # divides its float32 sum (the only value allowed to differ, in the last bit).
            avg_got, avg_want = got["odd"].pop("avg"), want["odd"].pop("avg")
            _assert_same(avg_got, avg_want, "odd.avg", exact=False)
            _assert_same(got, want, f"rank {rank} round {round_}")
            # Integer states stay integers, as torchmetrics' own sum gives them.
            assert got["odd"]["big"].dtype == got["odd"]["n32"].dtype == torch.int64
            assert got["odd"]["raw"].shape == (world, 2)
            assert torch.isnan(got["odd"]["hi"][0]) and torch.isnan(got["odd"]["lo"][2])
            assert cycle["report"].fallback == () and cycle["report"].skipped == ()
            assert cycle["report"].n_metrics == 11
    # Every rank computed the same global values.
    for cycle0, cycle in zip(results[0]["cycles"], results[-1]["cycles"], strict=True):
        _assert_same(cycle["got"], cycle0["got"], "ranks agree")


def test_at_most_four_collectives_against_torchmetrics_many(runs):
    _, results = runs
    for res in results:
        for cycle in res["cycles"]:
            assert cycle["n"] <= 4, cycle["n"]
            assert cycle["report"].n_collectives == cycle["n"]
            assert cycle["n_ref"] > 40  # torchmetrics: a barrier and gathers per state
            assert cycle["n_cached"] == 0


def test_local_states_come_back_after_the_block(runs):
    _, results = runs
    for res in results:
        for cycle in res["cycles"]:
            local, after = cycle["local"], cycle["after"]
            assert set(local) == set(after)
            for key, value in local.items():
                if isinstance(value, list):
                    assert len(after[key]) == len(value), key
                    for a, b in zip(after[key], value, strict=True):
                        assert torch.equal(a, b), key
                elif isinstance(value, tuple):
                    assert after[key] == value == (False, True, True, True), key
                else:
                    assert after[key].dtype == value.dtype, key
                    assert torch.equal(after[key].nan_to_num(), value.nan_to_num()), key
            # compute() after the block returns the global value cached inside, as torchmetrics
            # caches its own, with no collective.
            _assert_same(cycle["cached"], cycle["got"]["top"], "cached")


def test_stats_and_metrics_sync_together(runs):
    _, results = runs
    for res in results:
        for phase, c in res["combined"].items():
            # The stats' own sync plus the metrics' check, SUM (SumMetric) and gather (CatMetric).
            assert c["n"] == c["stats_n"] + 3 == c["report"].n_collectives, (phase, c["n"])
            assert c["report"].n_stats == 2 and c["report"].n_metrics == 2
            _assert_same(c["got"], c["want"], f"combined {phase}")
            for sd, ref in zip(c["stats"], c["stats_ref"], strict=True):
                _assert_same(sd, ref, f"stats {phase}")


def test_fallback_skip_and_own_group(runs):
    _, results = runs
    for rank, res in enumerate(results):
        s = res["special"]
        assert s["report"].fallback == ("custom",)
        assert "already synced" in s["nested"]
        _assert_same(s["got"]["cpu"], s["cpu"], "compute_on_cpu")
        assert s["cpu_restored"]
        # Not in the metric's group: nothing to sync with, compute() gives the local value.
        assert s["report"].skipped == (("local",) if rank < 2 else ("local", "own"))
        _assert_same(s["got"]["custom"], s["custom"], "custom")
        assert s["n_custom"] > 0
        assert s["got"]["local"].item() == 10.0**rank  # sync_on_compute=False: local value
        if rank < 2:
            _assert_same(s["got"]["own"], s["own"], "own group")
            assert s["got"]["own"].item() == 11.0  # ranks 0 and 1 only
        else:
            assert s["got"]["own"].item() == 100.0  # not in the group: its local value


def test_layout_mismatch_raises_on_every_rank(runs):
    _, results = runs
    for res in results:
        msg = res["mismatch"]
        assert set(msg) == {"metrics", "stats"}
        assert "acc" in msg["metrics"] and "different metric layouts" in msg["metrics"]
        assert "different stat layouts" in msg["stats"]


def test_nothing_to_sync_is_a_no_op(runs):
    world, results = runs
    n_rows = sum(3 + r for r in range(world))
    mean = sum(r * (3 + r) for r in range(world)) / n_rows
    for res in results:
        nothing = res["nothing"]
        for case in ("dict", "list", "model"):
            assert nothing[case] == (0, 0, True), case
        assert nothing["with_stats"] == (0, 1, True)
        count, means = nothing["stat"]  # the stats were still merged
        assert count == n_rows and means == pytest.approx([mean, mean], rel=1e-6)
        assert "different metric layouts" in nothing["lonely"] and "sum" in nothing["lonely"]


def test_docstring_example_runs():
    import doctest

    import statplug.distributed.metrics

    result = doctest.testmod(statplug.distributed.metrics)
    assert result.attempted > 0 and result.failed == 0


def test_without_a_process_group_nothing_changes():
    from torchmetrics import MeanMetric

    from statplug import sync_metrics

    model = nn.Module()
    model.mean = MeanMetric()
    model.mean.update(torch.tensor([1.0, 2.0]))
    with counting() as n, sync_metrics(model) as report:
        assert model.mean.compute().item() == 1.5
        assert not model.mean._is_synced
    assert n[0] == 0 and report.n_collectives == 0 and report.n_metrics == 1
    with pytest.raises(TypeError, match="got an item of type Tensor"), sync_metrics(
        [torch.ones(1)]
    ):
        pass
