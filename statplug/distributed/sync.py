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

from statplug._buffers import named_statplug_modules, qualified_name
from statplug.errors import StatLayoutError, StatplugError
from statplug.stats.base import Stat
from statplug.stats.syncing import Extrema, StateSums, SyncBatch, SyncPayload

__all__ = [
    "HeldPlan",
    "SyncReport",
    "SyncRider",
    "broadcast_stats",
    "find_stats",
    "layout_check_result",
    "layout_check_vector",
    "sync_stats",
]


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
        return [m for _, m in named_statplug_modules(module_or_stats, Stat)]
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
    name = stat.stat_name
    where = "" if name == type(stat).__name__ else f"{name} "
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
    halves) and the fingerprint of the state every rank must agree on (see
    ``Stat.sync_checksum``), in one float64 MAX of ``[v, -v]`` (equal on every rank iff
    max == -max(-v); never for NaN). Started at once, so local work that needs no other rank
    runs while it travels; :meth:`wait` raises on every rank when layouts or agreed states
    differ."""

    def __init__(
        self, plan: _Plan, group: dist.ProcessGroup | None, extra: Tensor | None = None
    ) -> None:
        self.plan, self.group = plan, group
        pairs = zip(plan.groups, plan.batches, strict=True)
        sums = [cls.sync_checksum(b) for (cls, _), b in pairs]
        check = sums[0] if len(sums) == 1 else torch.stack(sums).sum(0) if sums else None
        # A rider's fixed-size float64 part (see SyncRider) travels in the same MAX.
        self.t = layout_check_vector(plan.fingerprint_t, check, extra)
        self.n_bytes = self.t.numel() * self.t.element_size()
        self.work = dist.all_reduce(self.t, op=dist.ReduceOp.MAX, group=group, async_op=True)

    def wait(self, check_agreed: bool = True) -> None:
        """Raise :class:`StatLayoutError` on every rank if the layouts differ, or (with
        ``check_agreed``) if the ranks' agreed states differ."""
        self.work.wait()
        same_layout, same_agreed = layout_check_result(self.t)
        if not same_layout:
            _raise_layout_error(self.plan.layout, self.group)
        if check_agreed and not same_agreed:
            _raise_agreed_error(self.plan.stats, self.group)

    @property
    def extra(self) -> Tensor:
        """The reduced rider part (valid after :meth:`wait`)."""
        return self.t[2 * _CHECK_SIZE :]


# The layout check's vector: 2 layout fingerprint halves and the 4-entry exact agreed-state
# fingerprint, sent as [v, -v] (then any rider part) in one MAX.
_CHECK_SIZE = 6


def layout_check_vector(
    fingerprint_t: Tensor, checksum: Tensor | None, extra: Tensor | None
) -> Tensor:
    """What a rank sends in the layout check (see :class:`_LayoutCheck`); ``checksum`` None:
    a rank without stats."""
    if checksum is None:
        checksum = torch.zeros(_CHECK_SIZE - 2, dtype=torch.float64)
    v = torch.cat([fingerprint_t, checksum.to(fingerprint_t.device)])
    return torch.cat([v, -v] if extra is None else [v, -v, extra.to(v.device)])


def layout_check_result(reduced: Tensor) -> tuple[bool, bool]:
    """(same layout on every rank, same agreed state on every rank) from the reduced vector:
    equal everywhere iff max == min, i.e. ``max(v) == -max(-v)`` (never for NaN)."""
    n = _CHECK_SIZE
    high, neg_low = reduced[:n].tolist(), reduced[n : 2 * n].tolist()
    same = [h == -nl for h, nl in zip(high, neg_low, strict=True)]
    return all(same[:2]), all(same[2:])


def _agreed_summary(stat: Stat) -> tuple[int, tuple[float, ...]]:
    """(agreed count, fingerprint of the agreed state) of one stat, for error messages."""
    batch = SyncBatch([stat])
    batch.begin()
    count = int(batch.stack("_base_count")[0])
    return count, tuple(type(stat).sync_checksum(batch).tolist())


def _raise_agreed_error(stats: list[Stat], group: dist.ProcessGroup | None) -> None:
    # Error path only: gather every rank's per-stat agreed state to name the first that differs.
    mine = [_agreed_summary(s) for s in stats]
    world = dist.get_world_size(group)
    every: list[list[tuple[int, tuple[float, ...]]] | None] = [None] * world
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


def _no_plan() -> None:
    return None


class HeldPlan:
    """A sync plan kept in the ``__dict__`` of what it syncs: a deep copy or pickle of the holder
    drops it (None), so it never copies the other modules it refers to."""

    def __deepcopy__(self, memo: dict[int, object]) -> None:
        return None

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_no_plan, ())


class _Plan(HeldPlan):
    """What a sync of one set of stats needs besides the data: cached between syncs (on the
    module or stat that holds it, see :class:`HeldPlan`)."""

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

    def refresh(self, group: dist.ProcessGroup | None) -> None:
        """Follow stats that were moved to another device since the last sync."""
        if self.stats and self.stats[0].count.device != self.device:
            self._set_device(_device_of(self.stats, group))
            self.batches = [SyncBatch(group) for _, group in self.groups]


# Where a plan is kept between syncs: on the module synced, or on the first stat of a list. Never
# module-global, so a plan lives (and keeps its stats alive) only as long as what holds it.
_PLAN_ATTR = "_statplug_sync_plan"


def _plan_for(
    stats: list[Stat], group: dist.ProcessGroup | None, owner: nn.Module | None
) -> _Plan:
    holder = owner if owner is not None else (stats[0] if stats else None)
    plan = None if holder is None else holder.__dict__.get(_PLAN_ATTR)
    if not isinstance(plan, _Plan) or plan.stats != stats:  # identity of each stat
        plan = _Plan(stats, group)
        if holder is not None:
            holder.__dict__[_PLAN_ATTR] = plan
    return plan


def _plan_if_distributed(
    stats: list[Stat], group: dist.ProcessGroup | None, owner: nn.Module | None = None
) -> _Plan | None:
    """The plan for syncing ``stats``, or None when there is no one to sync with (no process
    group, or a group of one). A rank without stats still gets a plan: it must take part in the
    layout check, or its peers would wait for it."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    plan = _plan_for(stats, group, owner)
    plan.refresh(group)
    return plan


class _Packed:
    """Payloads packed into one flat float64 tensor, ready for one all-reduce."""

    def __init__(self, payloads: list[list[Tensor]], device: torch.device) -> None:
        flat_parts = [t.reshape(-1) for parts in payloads for t in parts]
        self.payloads = payloads
        self.flat = torch.cat(flat_parts).to(device, torch.float64) if flat_parts else None
        self.sizes = [t.numel() for t in flat_parts]
        self.n_bytes = 0 if self.flat is None else self.flat.numel() * 8

    def all_reduce(
        self, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None
    ) -> tuple[list[list[Tensor]], dist.Work | None]:
        """Start the all-reduce; returns the payloads' tensors as views of the result, and the
        work to wait for."""
        if self.flat is None:
            return [[] for _ in self.payloads], None
        work = dist.all_reduce(self.flat, op=op, group=group, async_op=True)
        pieces = iter(self.flat.split(self.sizes))
        return [[next(pieces).view(t.shape) for t in parts] for parts in self.payloads], work


def _tensors(payload: SyncPayload | None) -> list[Tensor]:
    return [] if payload is None else payload.tensors()


def _rebuilt(payload: SyncPayload | None, reduced: list[Tensor]) -> SyncPayload | None:
    return None if payload is None else payload.rebuilt(reduced)


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
    owner = module_or_stats if isinstance(module_or_stats, nn.Module) else None
    return _sync(find_stats(module_or_stats), group, None, start, owner)


def _sync(
    stats: list[Stat],
    group: dist.ProcessGroup | None,
    rider: SyncRider | None,
    start: float,
    owner: nn.Module | None = None,
) -> SyncReport:
    """:func:`sync_stats`' engine; a ``rider`` travels in the same collectives."""
    plan = _plan_if_distributed(stats, group, owner)
    if plan is None:
        return SyncReport(len(stats), 0, 0, time.perf_counter() - start)
    with torch.no_grad():
        for b in plan.batches:
            b.begin()
        extra = None if rider is None else rider.layout_extra()
        check = _LayoutCheck(plan, group, extra)
        # Phase-1 payloads are local work: made and packed while the fingerprints travel.
        round1 = _Round1(plan, rider)
        check.wait()  # before any collective whose size depends on the layout
        if rider is not None:
            rider.check_layout(check.extra)
        sums, maxes, ride1 = round1.reduce(group)
        classes = [cls for cls, _ in plan.groups]
        round2 = [c.sync_phase2(b, s) for c, b, s in zip(classes, plan.batches, sums, strict=True)]
        ride2 = None if rider is None else rider.phase2(any(p is not None for p in round2))
        packed2 = _Packed([*map(_tensors, round2), [] if ride2 is None else [ride2]], plan.device)
        reduced2, w3 = packed2.all_reduce(dist.ReduceOp.SUM, group)
        if w3 is not None:
            w3.wait()
        sums2 = [_rebuilt(p, r) for p, r in zip(round2, reduced2, strict=False)]
        for c, b, s, mx, s2 in zip(classes, plan.batches, sums, maxes, sums2, strict=True):
            c.sync_apply(b, s, mx, s2)
            b.flush()
        n_coll = 1 + round1.n_collectives + (w3 is not None)
        if rider is not None:
            ride_sum2 = reduced2[-1][0] if ride2 is not None else None
            n_coll += rider.finish(*ride1, ride_sum2)
    n_bytes = check.n_bytes + round1.n_bytes + packed2.n_bytes
    return SyncReport(len(stats), n_coll, n_bytes, time.perf_counter() - start)


class _Round1:
    """The first round: every batch's SUM and MAX payloads (and a rider's), packed into one
    SUM and one MAX all-reduce."""

    def __init__(self, plan: _Plan, rider: SyncRider | None) -> None:
        pairs = zip(plan.groups, plan.batches, strict=True)
        made = [cls.sync_phase1(b) for (cls, _), b in pairs]
        self.sums = [m[0] for m in made]
        self.maxes = [m[1] for m in made]
        r_sum, r_max = (None, None) if rider is None else rider.phase1()
        self.packed = (
            _Packed([*(p.tensors() for p in self.sums), _opt(r_sum)], plan.device),
            _Packed([*map(_tensors, self.maxes), _opt(r_max)], plan.device),
        )
        self.n_bytes = self.packed[0].n_bytes + self.packed[1].n_bytes
        self.n_collectives = 0

    def reduce(
        self, group: dist.ProcessGroup | None
    ) -> tuple[list[StateSums], list[Extrema | None], tuple[Tensor | None, Tensor | None]]:
        """Run both all-reduces; the reduced payloads, and the rider's reduced parts."""
        reduced_sums, w1 = self.packed[0].all_reduce(dist.ReduceOp.SUM, group)
        reduced_maxes, w2 = self.packed[1].all_reduce(dist.ReduceOp.MAX, group)
        for w in (w1, w2):
            if w is not None:
                w.wait()
                self.n_collectives += 1
        sums = [p.rebuilt(r) for p, r in zip(self.sums, reduced_sums, strict=False)]
        maxes = [
            None if p is None else p.rebuilt(r)
            for p, r in zip(self.maxes, reduced_maxes, strict=False)
        ]
        ride_sum = reduced_sums[-1][0] if reduced_sums[-1] else None
        ride_max = reduced_maxes[-1][0] if reduced_maxes[-1] else None
        return sums, maxes, (ride_sum, ride_max)


def _opt(t: Tensor | None) -> list[Tensor]:
    return [] if t is None else [t]


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
    for batch in plan.batches:
        batch.begin()
    check = _LayoutCheck(plan, group)
    check.wait(check_agreed=False)  # the agreed state is replaced
    global_src = src if group is None else dist.get_global_rank(group, src)
    n_coll, n_bytes = 1, check.n_bytes
    with torch.no_grad():
        for batch in plan.batches:
            for name in batch.state_names:
                value = batch.gather(name).clone()
                dist.broadcast(value, src=global_src, group=group)
                batch.scatter(name, value)
                n_coll += 1
                n_bytes += value.numel() * value.element_size()
            batch.flush()
        for stat in stats:
            stat.adopt_state_()  # the received state is the agreed base, as after a load
    return SyncReport(len(stats), n_coll, n_bytes, time.perf_counter() - start)
