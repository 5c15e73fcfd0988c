"""The wire format of sync_metrics in one process: pack each "rank", reduce by hand as the
collectives would (SUM, MAX, stack the padded rows), unpack, and compare with torchmetrics' own
reductions over the ranks' states. No process group needed."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("torchmetrics")

from torchmetrics import CatMetric, MaxMetric, MeanMetric, Metric, MinMetric, SumMetric

from statplug.distributed.metrics_plan import plan_metrics
from statplug.distributed.metrics_wire import (
    Payload,
    check_vector,
    gather_row,
    pack,
    read_check,
    unpack,
)

CPU = torch.device("cpu")


class Mixed(Metric):
    """Every route: float mean and sum, int64 sum past 2**32, int32/bool sums, float max/min,
    an int max (gathered), a None-reduced state (stacked) and a cat list."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("avg", torch.zeros(3), dist_reduce_fx="mean")
        self.add_state("total", torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("big", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n32", torch.zeros(2, dtype=torch.int32), dist_reduce_fx="sum")
        self.add_state("flags", torch.zeros(2, dtype=torch.bool), dist_reduce_fx="sum")
        self.add_state("hi", torch.full((2,), -torch.inf), dist_reduce_fx="max")
        self.add_state("lo", torch.full((2,), torch.inf), dist_reduce_fx="min")
        self.add_state("top", torch.zeros(2, dtype=torch.int64), dist_reduce_fx="max")
        self.add_state("raw", torch.zeros(2), dist_reduce_fx=None)
        self.add_state("items", [], dist_reduce_fx="cat")

    def update(self, rank: int) -> None:
        self.avg += torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
        self.total += torch.tensor([0.1, 1e10]) * (rank + 1)
        self.big += 2**33 + rank
        self.n32 += torch.tensor([rank, 7], dtype=torch.int32)
        self.flags |= torch.tensor([rank == 0, True])
        self.hi = torch.maximum(self.hi, torch.tensor([float(rank), torch.nan if rank else 0.0]))
        self.lo = torch.minimum(self.lo, torch.tensor([-float(rank), 5.0]))
        self.top = torch.maximum(self.top, torch.tensor([rank, 3 - rank]))
        self.raw = torch.tensor([rank, -rank], dtype=torch.float32)
        if rank != 1:  # rank 1 holds an empty list
            self.items.append(torch.arange(2 + rank, dtype=torch.float64).reshape(-1, 1))

    def compute(self) -> Tensor:
        return self.avg


def _ranks(world: int) -> list[dict[str, Metric]]:
    ranks = []
    for rank in range(world):
        metrics = {"mixed": Mixed(), "mean": MeanMetric(), "sum": SumMetric(),
                   "max": MaxMetric(), "min": MinMetric(), "cat": CatMetric()}
        metrics["mixed"].update(rank)
        for name in ("mean", "sum", "max", "min", "cat"):
            metrics[name].update(torch.arange(3.0 + rank) - rank)
        ranks.append(metrics)
    return ranks


def _by_hand(payloads: list[Payload]) -> tuple[Payload, Tensor | None]:
    """What SUM, MAX and all_gather give every rank."""
    def reduce(parts: list[Tensor | None], op: Any) -> Tensor | None:
        present = [p for p in parts if p is not None]
        return None if not present else op(torch.stack(present), 0)

    sums = reduce([p.sums for p in payloads], torch.sum)
    maxes = reduce([p.maxes for p in payloads], torch.amax)
    width = -(-max(p.n_blob_words for p in payloads) // 2) * 2
    rows = torch.stack([gather_row(p, width, CPU) for p in payloads]) if width else None
    return Payload(sums, maxes, None), rows


def _reference(ranks: list[dict[str, Metric]], name: str, attr: str) -> Any:
    """torchmetrics' reduction of one state over the ranks (its gather then dim_zero_*)."""
    from statplug._compat import metric_reduction

    values = [getattr(r[name], attr) for r in ranks]
    fn = metric_reduction(ranks[0][name], attr)
    if isinstance(values[0], list):
        return torch.cat([t for v in values for t in v])
    stacked = torch.stack(values)
    return fn(stacked) if callable(fn) else stacked


@pytest.mark.parametrize("world", [1, 2, 3])
def test_pack_unpack_round_trip_equals_torchmetrics_reductions(world: int) -> None:
    ranks = _ranks(world)
    plans = [plan_metrics(list(r.items())) for r in ranks]
    assert len({tuple(p.layout) for p in plans}) == 1  # the same layout on every rank
    reduced, rows = _by_hand([pack(p, CPU) for p in plans])
    for rank, plan in enumerate(plans):
        got = unpack(plan, reduced, rows, world)
        assert len(got) == sum(len(m._defaults) for m in ranks[rank].values())
        names = {id(m): n for n, m in ranks[rank].items()}
        for slot, value in got:
            want = _reference(ranks, names[id(slot.metric)], slot.attr)
            torch.testing.assert_close(value, want, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{names[id(slot.metric)]}.{slot.attr}")
            if not isinstance(slot.value(), list) and slot.reduce != "mean":
                sum_route = slot.route in ("sum_int",)
                assert value.dtype == (torch.int64 if sum_route else slot.dtype), slot.attr


def test_the_packed_payload_is_contiguous_on_the_requested_device() -> None:
    (metrics,) = _ranks(1)
    payload = pack(plan_metrics(list(metrics.items())), CPU)
    for part in (payload.sums, payload.maxes, payload.blob):
        assert part is not None and part.is_contiguous() and part.device == CPU
    assert payload.sums.dtype == payload.maxes.dtype == torch.float64
    assert payload.blob.dtype == torch.int64


def test_an_empty_plan_packs_nothing_and_unpacks_nothing() -> None:
    plan = plan_metrics([])
    payload = pack(plan, CPU)
    assert (payload.sums, payload.maxes, payload.blob) == (None, None, None)
    assert unpack(plan, payload, None, 2) == []


def test_the_check_vector_tells_layouts_stats_and_sizes() -> None:
    (a,) = _ranks(1)
    b = copy.deepcopy(a)
    b["extra"] = SumMetric()
    plan_a, plan_b = plan_metrics(list(a.items())), plan_metrics(list(b.items()))

    def reduced(plans: list[Any], n_stats: list[int], words: list[int]) -> Any:
        vecs = [check_vector(p, n, w, r, len(plans), CPU)
                for r, (p, n, w) in enumerate(zip(plans, n_stats, words, strict=True))]
        return read_check(torch.stack(vecs).amax(0))

    same = reduced([plan_a, plan_a], [2, 2], [5, 9])
    assert same.layouts_agree and same.stats_agree and same.sizes == [5, 9] and same.width == 10
    assert not reduced([plan_a, plan_b], [2, 2], [5, 5]).layouts_agree
    stats_differ = reduced([plan_a, plan_a], [2, 0], [0, 0])
    assert stats_differ.layouts_agree and not stats_differ.stats_agree
    assert stats_differ.width == 0
