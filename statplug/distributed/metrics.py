"""Coalesced sync of torchmetrics metrics: :func:`sync_metrics`.

torchmetrics syncs when a metric computes, state by state: ``gather_all_tensors`` makes a
barrier, an ``all_gather`` of sizes and an ``all_gather`` of data for every state of every
metric. :func:`sync_metrics` gives every metric its global state in at most 4 collectives per
process group, whatever the number of metrics: a fixed-size layout check, then one SUM, one MAX
and one ``all_gather`` (each only when some state needs it). The parts:

* :mod:`~statplug.distributed.metrics_plan`: which metrics, and where each state travels;
* :mod:`~statplug.distributed.metrics_wire`: the packing and unpacking (no collectives);
* this module: the collectives, and entering and leaving the synced state.

Stats passed with ``stats=`` are merged by :func:`~statplug.distributed.sync_stats` right after
the layout check (its own collectives). A state whose ``dist_reduce_fx`` is a custom callable, a
metric with its own ``dist_sync_fn`` or ``_sync_dist``: that metric alone is synced by
torchmetrics' own ``sync`` (the report names it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from statplug.distributed.group import group_device
from statplug.distributed.layout import first_difference
from statplug.distributed.metrics_plan import (
    MetricsLike,
    MetricsPlan,
    Named,
    find_metrics,
    plan_metrics,
)
from statplug.distributed.metrics_wire import (
    Payload,
    Results,
    check_vector,
    gather_row,
    pack,
    read_check,
    unpack,
)
from statplug.distributed.sync import find_stats, sync_stats
from statplug.errors import StatLayoutError
from statplug.stats.base import Stat

if TYPE_CHECKING:
    from torchmetrics import Metric

__all__ = ["MetricsSyncReport", "find_metrics", "sync_metrics"]


@dataclass(frozen=True)
class MetricsSyncReport:
    """What one :func:`sync_metrics` did.

    Attributes:
        n_metrics: metrics holding their global state inside the context.
        n_stats: stats merged with them (``stats=``), else 0.
        n_collectives: collective calls statplug made (0 when there is nothing to sync with),
            the stats' sync included; the ``fallback`` metrics' own not counted.
        n_bytes: payload bytes this rank contributed to those collectives.
        seconds: wall time of the sync on this rank.
        fallback: metrics synced by torchmetrics' own ``sync`` (custom reduce or sync function).
        skipped: metrics left local: as torchmetrics' ``compute`` would (``sync_on_compute=False``,
            or their ``distributed_available_fn`` says no), or whose own process group has one
            rank or does not hold this one.
    """

    n_metrics: int
    n_stats: int
    n_collectives: int
    n_bytes: int
    seconds: float
    fallback: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


# ------------------------------------------------------------------ the collectives
@dataclass
class _Exchanged:
    """One group's sync: the global states, and what it cost."""

    results: Results = field(default_factory=list)
    n_collectives: int = 0
    n_bytes: int = 0


def _raise_layout_error(plan: MetricsPlan, n_stats: int, group: Any, stats_agree: bool) -> None:
    """Raise :class:`StatLayoutError` on every rank naming the first metric (or the number of
    stats) that differs. Error path only: every rank's layout is gathered to find it."""
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (plan.layout, n_stats), group=group)
    if not stats_agree:
        counts = [n for _, n in gathered]
        raise StatLayoutError(
            f"sync_metrics: ranks hold different stat layouts: stats passed with `stats=` per "
            f"rank: {counts} (expected the same on every rank). Every rank must pass the same "
            "stats (or none)"
        )
    lists = [layout for layout, _ in gathered]
    first, per_rank = first_difference(lists, "<no metric>")
    raise StatLayoutError(
        f"sync_metrics: ranks hold different metric layouts; first difference at metric "
        f"#{first}: {per_rank}. Every rank must build, log and sync the same metrics in the same "
        f"order; counts per rank: {[len(lst) for lst in lists]}"
    )


@dataclass(frozen=True)
class _Stats:
    """The ``stats=`` argument as given (a module keeps its stats' qualified names for
    :func:`sync_stats`), and how many stats it holds."""

    given: nn.Module | Iterable[Stat] | None
    count: int

    @classmethod
    def of(cls, stats: nn.Module | Iterable[Stat] | None) -> _Stats:
        if stats is None:
            return cls(None, 0)
        found = find_stats(stats)
        # An iterator is used up by find_stats: hand sync_stats the list it found.
        return cls(stats if isinstance(stats, nn.Module) else found, len(found))


def _exchange(plan: MetricsPlan, group: Any, stats: _Stats) -> _Exchanged:
    """The collectives of one group: the check, the stats' sync (when every rank has some), then
    SUM, MAX and the gather together. Every rank makes the same calls: a rank with nothing to
    send still joins the check, and the rest follow from the reduced check alone."""
    device, world, rank = group_device(group), dist.get_world_size(group), dist.get_rank(group)
    payload = pack(plan, device)
    n_stats = stats.count
    check = check_vector(plan, n_stats, payload.n_blob_words, rank, world, device)
    dist.all_reduce(check, op=dist.ReduceOp.MAX, group=group)
    agreed = read_check(check)
    if not (agreed.layouts_agree and agreed.stats_agree):
        _raise_layout_error(plan, n_stats, group, agreed.stats_agree)
    out = _Exchanged(n_collectives=1, n_bytes=check.numel() * 8)
    if n_stats and stats.given is not None:
        report = sync_stats(stats.given, group=group)
        out.n_collectives += report.n_collectives
        out.n_bytes += report.n_bytes
    works = []
    for part, op in ((payload.sums, dist.ReduceOp.SUM), (payload.maxes, dist.ReduceOp.MAX)):
        if part is not None:
            works.append(dist.all_reduce(part, op=op, group=group, async_op=True))
            out.n_bytes += part.numel() * 8
    gathered = None
    if agreed.width:
        gathered = torch.empty(world, agreed.width, dtype=torch.int64, device=device)
        row = gather_row(payload, agreed.width, device)
        works.append(dist.all_gather(list(gathered.unbind(0)), row, group=group, async_op=True))
        out.n_bytes += row.numel() * 8
    for work in works:
        work.wait()
    out.n_collectives += len(works)
    out.results = unpack(plan, Payload(payload.sums, payload.maxes, None), gathered, world)
    return out


# ------------------------------------------------------------------ entering and leaving
@dataclass
class _Entered:
    """What leaving the context must undo."""

    coalesced: list[tuple[Metric, dict[str, Any]]] = field(default_factory=list)
    fallback: list[Metric] = field(default_factory=list)
    flags: list[tuple[Metric, bool, bool]] = field(default_factory=list)

    def hold_local(self, metrics: Iterable[Metric]) -> None:
        """compute() inside uses the state the metric holds and syncs nothing itself."""
        for m in metrics:
            self.flags.append((m, m._to_sync, m._should_unsync))
            m._to_sync = False
            m._should_unsync = False
            m._computed = None


def _enter(coalesced: list[Metric], results: Results, fallback: list[Metric], group: Any,
           state: _Entered) -> None:
    """Set the global states, caching the local ones, as torchmetrics' ``sync`` does."""
    for m in fallback:
        m.sync(dist_sync_fn=m.dist_sync_fn, process_group=m.process_group or group,
               distributed_available=m.distributed_available_fn)
        state.fallback.append(m)
    caches = [(m, {a: getattr(m, a) for a in m._defaults}) for m in coalesced]
    state.coalesced += caches
    for slot, value in results:
        setattr(slot.metric, slot.attr, value)
    for m, cache in caches:
        m._cache = cache
        m._is_synced = True
    state.hold_local([*coalesced, *fallback])


def _leave(state: _Entered) -> None:
    """Back to the local states, exactly as torchmetrics' ``unsync`` leaves a metric."""
    for m, to_sync, should_unsync in state.flags:
        m._to_sync = to_sync
        m._should_unsync = should_unsync
    for m, cache in state.coalesced:
        # A metric reset (or unsynced) inside keeps that state, as in torchmetrics' sync_context.
        if m._is_synced and m._cache is cache:
            for attr, value in cache.items():
                setattr(m, attr, value)
            m._is_synced = False
            m._cache = None
    for m in state.fallback:
        if m._is_synced:
            m.unsync()


def _distributed(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _buckets(named: Named, group: Any) -> list[tuple[Any, Named]]:
    """Metrics by the group they sync over: ``group`` first (even with none), then each metric's
    own process group in order of appearance."""
    out: dict[int, tuple[Any, Named]] = {id(group): (group, [])}
    for name, m in named:
        g = m.process_group if m.process_group is not None else group
        out.setdefault(id(g), (g, []))[1].append((name, m))
    return list(out.values())


@contextmanager
def sync_metrics(
    metrics: MetricsLike,
    group: dist.ProcessGroup | None = None,
    *,
    stats: nn.Module | Iterable[Stat] | None = None,
) -> Iterator[MetricsSyncReport]:
    """Inside the ``with`` block every torchmetrics metric holds its global state.

    ``compute()`` inside makes no collective of its own; on exit every metric is back to its
    local state, exactly as after torchmetrics' own sync and unsync, so further ``update``\\ s,
    another sync and ``reset`` behave as they would with torchmetrics alone (a value computed
    inside stays cached, as torchmetrics caches it, until the next ``update`` or ``reset``). At
    most 4 collectives per process group for any number of metrics (see the module docstring);
    results equal torchmetrics' own distributed ``compute()`` -- bit for bit for integer, max,
    min and cat states; float sums are reduced in float64 and rounded once, which on 3 or more
    ranks can differ from torchmetrics' float32 accumulation in the last bit. A no-op when
    ``torch.distributed`` is not initialised or the group has one rank; with nothing to sync
    (no metric on any rank) only the layout check runs.

    Metrics with ``sync_on_compute=False`` stay local; a metric with a ``process_group`` of its
    own syncs over it (one more exchange per such group); one with a custom ``dist_reduce_fx``
    callable, ``dist_sync_fn`` or ``_sync_dist`` is synced by torchmetrics' own ``sync`` (listed
    in ``report.fallback``).

    Args:
        metrics: a module (every ``torchmetrics.Metric`` inside, ``MetricCollection``\\ s
            included), or an iterable or a mapping (name to metric) of them.
        group: the process group for metrics without their own. Default: the world.
        stats: statplug stats (a module or an iterable) merged by :func:`sync_stats` over
            ``group`` -- for good, not only inside the block. Default: None.

    Yields:
        A :class:`MetricsSyncReport`.

    Raises:
        StatLayoutError: on every rank, when ranks hold different metrics (or stats).

    Example:
        >>> import torch
        >>> from torchmetrics import MeanMetric
        >>> from statplug import sync_metrics
        >>> mean = MeanMetric()
        >>> mean.update(torch.tensor([1.0, 2.0, 6.0]))
        >>> with sync_metrics([mean]) as report:   # not distributed here: nothing to do
        ...     value = mean.compute()
        >>> value.item(), report.n_collectives
        (3.0, 0)
    """
    start = time.perf_counter()
    named = find_metrics(metrics)
    state = _Entered()
    try:
        with torch.no_grad():
            report = _sync_and_enter(named, group, _Stats.of(stats), state)
    except BaseException:
        _leave(state)  # no metric stays half synced
        raise
    report = dataclasses.replace(report, seconds=time.perf_counter() - start)
    try:
        yield report
    finally:
        _leave(state)


def _sync_and_enter(
    named: Named, group: Any, stats: _Stats, state: _Entered
) -> MetricsSyncReport:
    n_stats = stats.count
    if not _distributed(group):
        if stats.given is None:
            return MetricsSyncReport(len(named), 0, 0, 0, 0.0)
        report = sync_stats(stats.given, group=group)  # its own no-op, or a group of one
        return MetricsSyncReport(len(named), n_stats, report.n_collectives, report.n_bytes, 0.0)
    coalesced: list[Metric] = []
    results: Results = []
    fallback: Named = []
    skipped: Named = []
    n_coll = n_bytes = 0
    for i, (g, bucket) in enumerate(_buckets(named, group)):
        if i > 0 and not _distributed(g):
            # A group of one, or one this rank is not in: nothing to sync with, and
            # torchmetrics' own sync would fail there; compute() inside gives the local value.
            skipped += bucket
            state.hold_local(m for _, m in bucket)
            continue
        plan = plan_metrics(bucket)
        ex = _exchange(plan, g, stats if i == 0 else _Stats(None, 0))
        n_coll, n_bytes = n_coll + ex.n_collectives, n_bytes + ex.n_bytes
        coalesced += [m for _, m in plan.coalesced]
        results += ex.results
        fallback += plan.fallback
        skipped += plan.skipped
    _enter(coalesced, results, [m for _, m in fallback], group, state)
    return MetricsSyncReport(
        len(coalesced) + len(fallback), n_stats, n_coll, n_bytes, 0.0,
        tuple(n for n, _ in fallback), tuple(n for n, _ in skipped),
    )
