"""Coalesced, exact, idempotent merging of stats across ranks: :func:`sync_stats`.

Every stat contributes float64 tensors to at most three coalesced collectives (see
:class:`statplug.stats.Stat`): a SUM of counts and sums around a shared centre, a MAX (minima
travel negated), and -- only when a one-phase merge would lose more than 10 bits -- a second SUM of
squared deviations around the global means (Chan's two-phase merge). A fixed-size layout
fingerprint goes first (it travels while the first payload is being made), so ranks holding
different stats fail with :class:`~statplug.errors.StatLayoutError` instead of hanging on
mismatched buffer sizes. At most 4 collective calls per sync, whatever the number of stats; the
volume is the payload itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from statplug._buffers import name_modules, qualified_name
from statplug.errors import StatLayoutError, StatplugError
from statplug.stats.base import Stat, SyncBatch

__all__ = ["SyncReport", "SyncRider", "broadcast_stats", "find_stats", "sync_stats"]


@dataclass(frozen=True)
class SyncReport:
    """What one :func:`sync_stats` call did.

    Attributes:
        n_stats: stats merged.
        n_collectives: collective calls made (0 when there is nothing to sync with).
        n_bytes: payload bytes this rank contributed to the collectives.
        seconds: wall time of the sync on this rank.
    """

    n_stats: int
    n_collectives: int
    n_bytes: int
    seconds: float


def find_stats(module_or_stats: nn.Module | Iterable[Stat]) -> list[Stat]:
    """Every :class:`Stat` in a module (walking ``modules()``, named for messages) or iterable."""
    if isinstance(module_or_stats, Stat):
        return [module_or_stats]
    if isinstance(module_or_stats, nn.Module):
        # One walk both names the stats for messages and finds them.
        return [m for m in name_modules(module_or_stats) if isinstance(m, Stat)]
    stats = list(module_or_stats)
    if all(map(isinstance, stats, repeat(Stat))):  # C-level check of every item
        return stats
    for s in stats:
        if not isinstance(s, Stat):
            raise TypeError(
                f"sync_stats: expected a module or an iterable of Stat, got an item of type "
                f"{type(s).__name__}"
            )
    return stats


def _describe(stat: Stat) -> str:
    states = ",".join(
        f"{n}:{tuple(stat._buffers[n].shape)}:{stat._buffers[n].dtype}"  # type: ignore[union-attr]
        for n in stat.state_names
    )
    name = stat._statplug_name
    where = f"{name} " if name else ""
    return f"{where}{type(stat).__name__}(shape={stat.shape}) [{states}]"


def _fingerprint(layout: list[str]) -> tuple[float, float]:
    """A 62-bit hash of the layout as two float64-exact halves."""
    digest = hashlib.blake2b("\n".join(layout).encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "little") >> 2
    return float(h >> 31), float(h & (2**31 - 1))


def _device_of(stats: list[Stat], group: dist.ProcessGroup | None) -> torch.device:
    if not stats:  # a rank without stats still takes part in the layout check
        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    devices = {s._buffers["count"].device for s in stats}  # type: ignore[union-attr]
    if len(devices) > 1:
        raise StatplugError(
            f"sync_stats: stats live on several devices {sorted(map(str, devices))}; move the "
            "model to one device before syncing"
        )
    return devices.pop()


class _LayoutCheck:
    """The fixed-size exchange that goes first: the layout fingerprint (two float64-exact
    halves) and one checksum of the state every rank must agree on (see
    ``Stat._sync_checksum``), in one float64 MAX of ``[v, -v]`` (equal on every rank iff
    max == -max(-v); never for NaN). Started at once, so local work that needs no other rank
    runs while it travels; :meth:`wait` raises on every rank when layouts or agreed states
    differ."""

    def __init__(
        self, plan: _Plan, group: dist.ProcessGroup | None, extra: Tensor | None = None
    ) -> None:
        self.plan, self.group = plan, group
        pairs = zip(plan.groups, plan.batches, strict=True)
        sums = [cls._sync_checksum(b) for (cls, _), b in pairs]
        check = sums[0] if len(sums) == 1 else torch.stack(sums).sum() if sums else plan.zero
        v = torch.cat([plan.fingerprint_t, check.reshape(1)])
        # A rider's fixed-size float64 part (see SyncRider) travels in the same MAX.
        self.t = torch.cat([v, -v] if extra is None else [v, -v, extra.to(v.device)])
        self.work = dist.all_reduce(self.t, op=dist.ReduceOp.MAX, group=group, async_op=True)

    def wait(self, check_agreed: bool = True) -> None:
        """Raise :class:`StatLayoutError` on every rank if the layouts differ, or (with
        ``check_agreed``) if the ranks' agreed states differ."""
        self.work.wait()
        hi, lo, check, neg_hi, neg_lo, neg_check = self.t[:6].tolist()
        if hi != -neg_hi or lo != -neg_lo:  # max != min: some rank holds another layout
            _raise_layout_error(self.plan.layout, self.group)
        if check_agreed and check != -neg_check:
            _raise_agreed_error(self.plan.stats, self.group)

    @property
    def extra(self) -> Tensor:
        """The reduced rider part (valid after :meth:`wait`)."""
        return self.t[6:]


def _agreed_summary(stat: Stat) -> tuple[int, float]:
    """(agreed count, checksum of the agreed state) of one stat, for error messages."""
    batch = SyncBatch([stat])
    batch.begin()
    return int(stat._buffers["_base_count"]), float(type(stat)._sync_checksum(batch))  # type: ignore[arg-type]


def _raise_agreed_error(stats: list[Stat], group: dist.ProcessGroup | None) -> None:
    # Error path only: gather every rank's per-stat agreed state to name the first that differs.
    mine = [_agreed_summary(s) for s in stats]
    world = dist.get_world_size(group)
    every: list[list[tuple[int, float]] | None] = [None] * world
    dist.all_gather_object(every, mine, group=group)
    lists = [lst or [] for lst in every]
    first = next(
        (i for i in range(len(stats)) if len({lst[i] for lst in lists}) > 1), 0
    )
    name = qualified_name(stats[first]) if stats else "<no stat>"
    counts = ", ".join(f"rank {r}: {lst[first][0]}" for r, lst in enumerate(lists) if lst)
    raise StatLayoutError(
        f"sync_stats: ranks disagree on the already-merged state of {name} (agreed sample "
        f"counts {counts}); a sync would leave them different. This happens when a checkpoint "
        "or reset reached some ranks only. Load the same state on every rank, or call "
        "statplug.distributed.broadcast_stats(model) to make one rank's state everyone's"
    )


def _raise_layout_error(
    layout: list[str], group: dist.ProcessGroup | None, *, what: str = "stat",
    caller: str = "sync_stats", fix: str = "build the same stats in the same order",
) -> None:
    """Raise :class:`StatLayoutError` naming the first ``what`` (stat, metric) whose layout
    differs between ranks. Error path only: every rank's layout is gathered to find it."""
    world = dist.get_world_size(group)
    layouts: list[list[str] | None] = [None] * world
    dist.all_gather_object(layouts, layout, group=group)
    lists = [lst or [] for lst in layouts]

    def at(lst: list[str], i: int) -> str | None:
        return lst[i] if i < len(lst) else None

    n_max = max(len(lst) for lst in lists)
    first = next((i for i in range(n_max + 1) if len({at(lst, i) for lst in lists}) > 1), 0)
    per_rank = "; ".join(
        f"rank {r}: {at(lst, first) or f'<no {what}>'}" for r, lst in enumerate(lists)
    )
    raise StatLayoutError(
        f"{caller}: ranks hold different {what} layouts; first difference at {what} #{first}: "
        f"{per_rank}. Every rank must {fix} (same model and config); counts per rank: "
        f"{[len(lst) for lst in lists]}"
    )


class _Plan:
    """What a sync of one set of stats needs besides the data: cached between syncs."""

    def __init__(self, stats: list[Stat], group: dist.ProcessGroup | None) -> None:
        self.stats = stats
        self.layout = [_describe(s) for s in stats]
        self.fingerprint = _fingerprint(self.layout)
        self._set_device(_device_of(stats, group))
        # One batch per class and accumulator dtype: a batch's stacked tensors hold one dtype.
        groups: dict[tuple[type[Stat], torch.dtype], list[Stat]] = {}
        for s in stats:
            groups.setdefault((type(s), s.accumulator_dtype), []).append(s)
        self.groups = [(cls, group) for (cls, _), group in groups.items()]
        self.batches = [SyncBatch(group) for _, group in self.groups]

    def _set_device(self, device: torch.device) -> None:
        self.device = device
        self.fingerprint_t = torch.tensor(self.fingerprint, dtype=torch.float64, device=device)
        self.zero = torch.zeros((), dtype=torch.float64, device=device)

    def refresh(self, group: dist.ProcessGroup | None) -> None:
        """Follow stats that were moved to another device since the last sync."""
        if self.stats and self.stats[0].count.device != self.device:
            self._set_device(_device_of(self.stats, group))
            self.batches = [SyncBatch(group) for _, group in self.groups]


_PLANS: dict[tuple[int, ...], tuple[list[Stat], _Plan]] = {}


def _plan_for(stats: list[Stat], group: dist.ProcessGroup | None) -> _Plan:
    key = tuple(map(id, stats))
    hit = _PLANS.get(key)
    # The stats are kept alongside, so their ids cannot be reused while the entry lives.
    if hit is None:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        hit = (stats, _Plan(stats, group))
        _PLANS[key] = hit
    return hit[1]


def _plan_if_distributed(stats: list[Stat], group: dist.ProcessGroup | None) -> _Plan | None:
    """The plan for syncing ``stats``, or None when there is no one to sync with (no process
    group, or a group of one). A rank without stats still gets a plan: it must take part in the
    layout check, or its peers would wait for it."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    plan = _plan_for(stats, group)
    plan.refresh(group)
    return plan


class _Packed:
    """Segments packed into one flat float64 tensor, ready for one all-reduce."""

    def __init__(self, segments: list[list[Tensor]], device: torch.device) -> None:
        flat_parts = [t.reshape(-1) for parts in segments for t in parts]
        self.segments = segments
        self.flat = torch.cat(flat_parts).to(device, torch.float64) if flat_parts else None
        self.sizes = [t.numel() for t in flat_parts]
        self.n_bytes = 0 if self.flat is None else self.flat.numel() * 8

    def all_reduce(
        self, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None
    ) -> tuple[list[list[Tensor]], dist.Work | None]:
        """Start the all-reduce; returns the segments as views of the result, and the work."""
        if self.flat is None:
            return [[] for _ in self.segments], None
        work = dist.all_reduce(self.flat, op=op, group=group, async_op=True)
        pieces = iter(self.flat.split(self.sizes))
        return [[next(pieces).view(t.shape) for t in parts] for parts in self.segments], work


class SyncRider(Protocol):
    """Data of another kind that travels in :func:`sync_stats`' collectives instead of its own.

    The extension point :func:`statplug.distributed.sync_metrics` uses to sync torchmetrics
    metrics in the stats' round trips. Every rank passes a rider of the same kind, or none.
    """

    def layout_extra(self) -> Tensor:
        """A float64 vector of a size every rank knows beforehand, MAX-reduced with the
        stats' layout check."""
        ...

    def check_layout(self, reduced: Tensor) -> None:
        """Given the reduced :meth:`layout_extra`, raise on every rank if the ranks disagree."""
        ...

    def phase1(self) -> tuple[Tensor | None, Tensor | None]:
        """float64 payloads for the first SUM and for the MAX (None: nothing)."""
        ...

    def phase2(self, runs: bool) -> Tensor | None:
        """A float64 payload for the second SUM; ``runs``: whether it runs for the stats."""
        ...

    def finish(self, sums: Tensor | None, maxes: Tensor | None, sums2: Tensor | None) -> int:
        """Take the reduced payloads; return the number of collectives it made itself."""
        ...


def sync_stats(
    module_or_stats: nn.Module | Iterable[Stat], group: dist.ProcessGroup | None = None
) -> SyncReport:
    """Merge every stat across the ranks of ``group``; afterwards each rank holds the global stats.

    Exact (Chan's merge for moments, in one or two phases, MIN/MAX for extrema, count sums),
    idempotent (only data added since the previous sync or load travels, so syncing twice changes
    nothing and a checkpoint loaded on N ranks counts once), and coalesced (at most 4 collectives
    for any number of stats). A no-op returning ``n_collectives == 0`` when ``torch.distributed``
    is not initialised or the group has one rank.

    Args:
        module_or_stats: a module (every :class:`Stat` inside is found) or an iterable of stats.
        group: the process group. Default: the world.

    Raises:
        StatLayoutError: on every rank, when ranks hold different stats.

    Example:
        >>> import torch
        >>> from statplug import RunningMoments, sync_stats
        >>> stat = RunningMoments(3)
        >>> stat.update(torch.randn(8, 3))
        >>> sync_stats(stat).n_collectives   # not distributed here: nothing to do
        0
    """
    start = time.perf_counter()
    return _sync(find_stats(module_or_stats), group, None, start)


def _sync(
    stats: list[Stat], group: dist.ProcessGroup | None, rider: SyncRider | None, start: float
) -> SyncReport:
    """:func:`sync_stats`' engine; a ``rider`` travels in the same collectives."""
    plan = _plan_if_distributed(stats, group)
    if plan is None:
        return SyncReport(len(stats), 0, 0, time.perf_counter() - start)
    device = plan.device
    n_coll, n_bytes = 1, 48

    with torch.no_grad():
        batches = plan.batches
        groups = plan.groups
        for b in batches:
            b.begin()
        extra = None if rider is None else rider.layout_extra()
        check = _LayoutCheck(plan, group, extra)
        n_bytes += 0 if extra is None else extra.numel() * 8
        # Phase-1 segments are local work: made and packed while the fingerprints travel.
        phase1 = [cls._sync_phase1(b) for (cls, _), b in zip(groups, batches, strict=True)]
        if rider is not None:
            r_sum, r_max = rider.phase1()
            phase1.append(([] if r_sum is None else [r_sum], [] if r_max is None else [r_max]))
        packed = _Packed([p[0] for p in phase1], device), _Packed([p[1] for p in phase1], device)
        check.wait()  # before any collective whose size depends on the layout
        if rider is not None:
            rider.check_layout(check.extra)
        sums1, w1 = packed[0].all_reduce(dist.ReduceOp.SUM, group)
        maxes, w2 = packed[1].all_reduce(dist.ReduceOp.MAX, group)
        for w in (w1, w2):
            if w is not None:
                w.wait()
                n_coll += 1
        ride1 = (sums1.pop(), maxes.pop()) if rider is not None else ([], [])
        phase2 = [
            cls._sync_phase2(b, s1) for (cls, _), b, s1 in zip(groups, batches, sums1, strict=True)
        ]
        if rider is not None:
            ride2 = rider.phase2(any(phase2))
            phase2.append([] if ride2 is None else [ride2])
        packed2 = _Packed(phase2, device)
        sums2, w3 = packed2.all_reduce(dist.ReduceOp.SUM, group)
        if w3 is not None:
            w3.wait()
            n_coll += 1
        ride2_sums = sums2.pop() if rider is not None else []
        b1, b2, b3 = packed[0].n_bytes, packed[1].n_bytes, packed2.n_bytes
        for (cls, _), b, s1, mx, s2 in zip(groups, batches, sums1, maxes, sums2, strict=True):
            cls._sync_apply(b, s1, mx, s2)
            b.flush()
        if rider is not None:
            n_coll += rider.finish(*(r[0] if r else None for r in (*ride1, ride2_sums)))
    return SyncReport(len(stats), n_coll, n_bytes + b1 + b2 + b3, time.perf_counter() - start)


def broadcast_stats(
    module_or_stats: nn.Module | Iterable[Stat],
    src: int = 0,
    group: dist.ProcessGroup | None = None,
) -> SyncReport:
    """Make rank ``src``'s stats the agreed state of every rank of ``group``.

    For state that is one copy of the same data on every rank -- stats warmed up before a
    launcher copied the model to each rank, say -- which a sync would otherwise count once per
    rank. Each stat is settled first (:meth:`Stat.settle_`), so after the call every rank holds
    ``src``'s full state as data already agreed; only data added afterwards travels at the next
    :func:`sync_stats`. One collective per state name and stat class, whatever the number of
    stats, after the same layout check as :func:`sync_stats`. Without a process group (or with one
    rank) it only settles.

    Example:
        >>> import torch
        >>> from statplug import RunningMoments
        >>> from statplug.distributed import broadcast_stats
        >>> stat = RunningMoments(2)
        >>> stat.update(torch.ones(4, 2))
        >>> broadcast_stats(stat).n_collectives, stat.count.item()
        (0, 4)
    """
    start = time.perf_counter()
    stats = find_stats(module_or_stats)
    with torch.no_grad():
        for stat in stats:
            stat.settle_()
    plan = _plan_if_distributed(stats, group)
    if plan is None:
        return SyncReport(len(stats), 0, 0, time.perf_counter() - start)
    _LayoutCheck(plan, group).wait(check_agreed=False)  # the agreed state is replaced
    global_src = src if group is None else dist.get_global_rank(group, src)
    n_coll, n_bytes = 1, 48
    with torch.no_grad():
        for batch in plan.batches:
            batch.begin()
            for name in batch.stats[0].state_names:
                value = batch.gather(name).clone()
                dist.broadcast(value, src=global_src, group=group)
                batch.scatter(name, value)
                n_coll += 1
                n_bytes += value.numel() * value.element_size()
            batch.flush()
        for stat in stats:
            stat._after_load({})  # the received state is the agreed base, as after a load
    return SyncReport(len(stats), n_coll, n_bytes, time.perf_counter() - start)
