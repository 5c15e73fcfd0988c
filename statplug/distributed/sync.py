"""Exact, coalesced, idempotent merging of stats across ranks: :func:`sync_stats`.

A sync, in order:

1. :func:`find_stats` names the stats (qualified names, dict keys, or positions);
2. :func:`_check_ranks`: one MAX all-reduce of a fixed-size vector -- the layout fingerprint, the
   exact checksum of the agreed state, and whether a rank holds a batch refused on the device.
   Ranks that differ raise :class:`~statplug.errors.StatLayoutError` on every rank, never hang;
3. :class:`_Contribution` of each stat: what it added since the agreed state (``"sum"`` states),
   its extremes (``"min"``/``"max"``), its new data summed around the centre every rank shares
   (``"moments"``). They are packed into one SUM and one MAX bucket and reduced;
4. moments whose one-phase merge would lose more than 10 bits take Chan's second phase: one more
   SUM of squared deviations about the global new mean;
5. results are copied back into each stat's buffers and become the agreed state.

At most 4 collectives (more only when a bucket exceeds 64 MiB and is sent in chunks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from statplug._buffers import named_statplug_modules
from statplug.distributed.group import group_device
from statplug.distributed.layout import (
    agreed_checksum,
    describe_stat,
    first_difference,
    layout_fingerprint,
)
from statplug.errors import StatLayoutError, StatplugError
from statplug.stats.base import Stat, StatBatch, state_lock
from statplug.stats.merge import Moments, positive

__all__ = ["SyncReport", "broadcast_stats", "find_stats", "named_stats", "sync_stats"]

_F64 = torch.float64
# A bucket larger than this many float64 values (64 MiB) is reduced in chunks.
_CHUNK = 1 << 23
# One phase keeps at least 43 of float64's 53 bits of every merged m2 (see design-notes.md).
_ONE_PHASE_RATIO = 2.0**-10

StatsArg = nn.Module | Mapping[str, Stat] | Iterable[Stat]


@dataclass(frozen=True)
class SyncReport:
    """What one :func:`sync_stats` call did.

    Attributes:
        n_stats: stats merged.
        n_collectives: collective calls made (0 when there is no process group).
        n_bytes: payload bytes this rank contributed to the collectives.
        seconds: wall time of the sync on this rank.
    """

    n_stats: int
    n_collectives: int
    n_bytes: int
    seconds: float


def named_stats(module_or_stats: StatsArg) -> list[tuple[str, Stat]]:
    """Every stat with the name ranks compare it by: its qualified name in a module, its key in
    a dict (sorted), its position (``"#0"``, ...) in any other iterable."""
    if isinstance(module_or_stats, Stat):
        return [(module_or_stats.stat_name, module_or_stats)]
    if isinstance(module_or_stats, nn.Module):
        return named_statplug_modules(module_or_stats, Stat)
    if isinstance(module_or_stats, Mapping):
        items = sorted(module_or_stats.items())
    else:
        items = [(f"#{i}", s) for i, s in enumerate(module_or_stats)]
    for key, s in items:
        if not isinstance(s, Stat):
            raise TypeError(
                f"sync_stats: expected a module, a dict of Stat or an iterable of Stat, got "
                f"{type(s).__name__} at {key!r}"
            )
    return items


def find_stats(module_or_stats: StatsArg) -> list[Stat]:
    """Every :class:`Stat` in a module (walking ``modules()``), a dict or an iterable."""
    return [s for _, s in named_stats(module_or_stats)]


class _Collectives:
    """The collectives of one sync on ``group``: inputs built on the group's device, contiguous,
    large buckets chunked; counts calls and bytes for the report."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.device = group_device(group)
        self.calls = 0
        self.n_bytes = 0

    def all_reduce(self, pieces: list[Tensor], op: dist.ReduceOp.RedOpType) -> list[Tensor]:
        """Reduce ``pieces`` (float64, any device) as one flat bucket; returns the reduced
        pieces (views of the bucket, on the group's device)."""
        if not pieces:
            return []
        flat = torch.cat([p.reshape(-1).to(self.device, _F64) for p in pieces])
        for start in range(0, flat.numel(), _CHUNK):
            dist.all_reduce(flat[start : start + _CHUNK], op=op, group=self.group)
            self.calls += 1
        self.n_bytes += flat.numel() * flat.element_size()
        return [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in pieces]), pieces,
                                                 strict=True)]

    def broadcast(self, flat: Tensor, src: int) -> None:
        for start in range(0, flat.numel(), _CHUNK):
            dist.broadcast(flat[start : start + _CHUNK], src=src, group=self.group)
            self.calls += 1
        self.n_bytes += flat.numel() * flat.element_size()


def _check_ranks(
    named: list[tuple[str, Stat]],
    batches: list[StatBatch],
    comm: _Collectives,
    *,
    agreed: bool = True,
) -> None:
    """The fixed-size exchange that goes first; raises on every rank when ranks hold different
    layouts or (with ``agreed``) different agreed states, or when a rank refused a batch."""
    stats = [s for _, s in named]
    fingerprint = torch.tensor(layout_fingerprint(stats, [n for n, _ in named]), dtype=_F64)
    checksum = agreed_checksum(batches if agreed else [], comm.device)
    same = torch.cat([fingerprint.to(comm.device), checksum])
    refused = [s.get_buffer("_refused").to(comm.device, _F64) for s in stats]
    n_refused = torch.stack(refused).sum().reshape(1) if refused else same[:1] * 0
    vector = torch.cat([same, -same, n_refused])
    (reduced,) = comm.all_reduce([vector], dist.ReduceOp.MAX)
    high, neg_low, any_refused = reduced[:6], reduced[6:12], reduced[12]
    equal = (high == -neg_low).tolist()
    if not all(equal[:2]):
        _raise_layout_error([describe_stat(s, n) for n, s in named], comm.group)
    if bool(any_refused > 0):
        for s in stats:
            s.check()  # this rank's own error, naming the stat
        raise StatplugError(
            "sync_stats: another rank refused a batch holding NaN or Inf (nan_policy='raise'); "
            "its error names the stat. The sync was not run"
        )
    if agreed and not all(equal[2:]):
        _raise_agreed_error(named, comm.group)


def _raise_layout_error(layout: list[str], group: dist.ProcessGroup | None) -> None:
    """Name the first stat whose layout differs between ranks (error path: gathers layouts)."""
    lists: list[list[str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(lists, layout, group=group)
    every = [lst or [] for lst in lists]
    first, per_rank = first_difference(every, "<no stat>")
    raise StatLayoutError(
        f"sync_stats: ranks hold different stat layouts; first difference at stat #{first}: "
        f"{per_rank}. Every rank must build the same stats under the same names (same model "
        f"and config); stats per rank: {[len(lst) for lst in every]}"
    )


def _raise_agreed_error(named: list[tuple[str, Stat]], group: dist.ProcessGroup | None) -> None:
    """Name the first stat whose agreed state differs (error path: gathers per-stat sums)."""
    cpu = torch.device("cpu")
    mine = [
        (int(s.agreed("count")), agreed_checksum([StatBatch([s])], cpu).tolist())
        for _, s in named
    ]
    lists: list[list[tuple[int, list[float]]] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(lists, mine, group=group)
    every = [lst or [] for lst in lists]
    first = next((i for i in range(len(mine)) if any(lst[i] != mine[i] for lst in every)), 0)
    name = named[first][0] if named else "<no stat>"
    counts = ", ".join(f"rank {r}: {lst[first][0]}" for r, lst in enumerate(every) if lst)
    raise StatLayoutError(
        f"sync_stats: ranks disagree on the already-merged state of {name} (agreed sample "
        f"counts {counts}); a sync would leave them different. This happens when a checkpoint "
        "or reset reached some ranks only. Load the same state on every rank, or call "
        "statplug.distributed.broadcast_stats(model) to make one rank's state everyone's"
    )


def _batches(stats: list[Stat]) -> list[StatBatch]:
    """The stats grouped by class and state layout (names and dtypes), in order of first
    appearance: each batch syncs with a constant number of tensor calls."""
    groups: dict[tuple[object, ...], list[Stat]] = {}
    for s in stats:
        key = (type(s), s.accumulator_dtype, *s._reduces)
        groups.setdefault(key, []).append(s)
    return [StatBatch(group) for group in groups.values()]


@dataclass
class _Contribution:
    """What one batch of stats sends (float64, flat), and then receives, in a sync."""

    batch: StatBatch
    sums: dict[str, Tensor] = field(default_factory=dict)  # added since the agreed state
    extremes: dict[str, Tensor] = field(default_factory=dict)  # max, or -min; NaN as -inf
    nans: dict[str, Tensor] = field(default_factory=dict)  # 1.0 where a value is NaN
    new: Moments | None = None  # this rank's data since the agreed state, per element
    centre: Tensor | None = None  # the agreed mean, equal on every rank

    @classmethod
    def of(cls, batch: StatBatch) -> _Contribution:
        c = cls(batch)
        proto = batch.stats[0]
        for name, reduce in proto._reduces.items():
            if reduce == "sum":
                c.sums[name] = batch.read(name) - batch.agreed(name)
            elif reduce in ("min", "max"):
                value = batch.read(name) * (1.0 if reduce == "max" else -1.0)
                c.extremes[name] = value.nan_to_num(nan=-math.inf)
                c.nans[name] = value.isnan().to(_F64)
        found = type(proto).sync_new_data(batch)
        if found is not None:
            c.new, c.centre = found
        return c

    def first_round(self) -> tuple[list[Tensor], list[Tensor]]:
        """The SUM pieces (sums, then the new data about the centre) and the MAX pieces."""
        sums = list(self.sums.values())
        if self.new is not None and self.centre is not None:
            n, d = torch.as_tensor(self.new.n, dtype=_F64), self.new.mean - self.centre
            sums += [n, n * d, self.new.m2 + n * d * d]
        return sums, [*self.extremes.values(), *self.nans.values()]

    def write_back(self, sums: list[Tensor], maxes: list[Tensor], new: Moments | None) -> None:
        """Copy the reduced values into the stats; they become their agreed state."""
        batch = self.batch
        if new is not None:
            type(batch.stats[0]).sync_absorb(batch, new)
        for name, total in zip(self.sums, sums, strict=False):
            if not batch.buffers(name)[0].is_floating_point():
                total = total.round()  # integer sums travel as float64: exact below 2**53
            batch.write(name, batch.agreed(name) + total.to(_F64))
        k = len(self.extremes)
        for name, value, nan in zip(self.extremes, maxes[:k], maxes[k:], strict=True):
            sign = 1.0 if self.batch.stats[0]._reduces[name] == "max" else -1.0
            batch.write(name, torch.where(nan > 0, math.nan, value * sign))
        batch.settle()


def _merge_moments(
    parts: list[_Contribution], sums: list[list[Tensor]], comm: _Collectives
) -> list[Moments | None]:
    """Every batch's global new data from the reduced first round; Chan's second phase (one
    more SUM) when the one-phase result would lose more than 10 bits somewhere."""
    found: list[Moments | None] = []
    kept: list[Tensor] = []
    for part, reduced in zip(parts, sums, strict=True):
        if part.new is None or part.centre is None:
            found.append(None)
            continue
        n, s1, s2 = (t.to(part.centre.device) for t in reduced[len(part.sums) :])
        gk = s1 / positive(n)  # g - K: the new data's global mean, about the centre
        m2 = s2 - gk * s1
        kept.append((m2 >= s2 * _ONE_PHASE_RATIO).all())  # False for NaN too
        found.append(Moments(n, part.centre + gk, m2))
    if not kept or bool(torch.stack(kept).all()):  # one host read, the same on every rank
        return found
    pieces = [
        p.new.m2 + torch.as_tensor(p.new.n) * (p.new.mean - m.mean).square()
        for p, m in zip(parts, found, strict=True)
        if p.new is not None and m is not None
    ]
    second = iter(comm.all_reduce(pieces, dist.ReduceOp.SUM))
    return [
        None if m is None else Moments(m.n, m.mean, next(second).to(m.mean.device))
        for m in found
    ]


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized()


def sync_stats(module_or_stats: StatsArg, group: dist.ProcessGroup | None = None) -> SyncReport:
    """Merge every stat across the ranks of ``group``; afterwards each rank holds the global stats.

    Exact (Chan's merge for moments, MIN/MAX for extrema, count sums), idempotent (only data
    added since the previous sync or load travels, so syncing twice changes nothing and a
    checkpoint loaded on N ranks counts once), and coalesced (at most 4 collectives for any
    number of stats). With a process group it runs at any world size, one included; without
    one it is a no-op returning ``n_collectives == 0``.

    Args:
        module_or_stats: a module (every :class:`Stat` inside, matched across ranks by qualified
            name), a ``dict`` of stats (matched by key) or an iterable of stats (matched by
            position: every rank must pass them in the same order).
        group: the process group. Default: the world.

    Raises:
        StatLayoutError: on every rank, when ranks hold different stats or agreed states.

    Example:
        >>> import torch
        >>> from statplug import RunningMoments, sync_stats
        >>> stat = RunningMoments(3)
        >>> stat.update(torch.randn(8, 3))
        >>> sync_stats({"x": stat}).n_collectives   # not distributed here: nothing to do
        0
    """
    start = time.perf_counter()
    named = named_stats(module_or_stats)
    if not _distributed(group):
        return SyncReport(len(named), 0, 0, time.perf_counter() - start)
    comm = _Collectives(group)
    with state_lock(), torch.no_grad():
        batches = _batches([s for _, s in named])
        _check_ranks(named, batches, comm)
        parts = [_Contribution.of(b) for b in batches]
        rounds = [p.first_round() for p in parts]
        sums = _split(comm.all_reduce([t for r in rounds for t in r[0]], dist.ReduceOp.SUM),
                      [len(r[0]) for r in rounds])
        maxes = _split(comm.all_reduce([t for r in rounds for t in r[1]], dist.ReduceOp.MAX),
                       [len(r[1]) for r in rounds])
        news = _merge_moments(parts, sums, comm)
        for part, s, m, new in zip(parts, sums, maxes, news, strict=True):
            part.write_back(s, m, new)
    return SyncReport(len(named), comm.calls, comm.n_bytes, time.perf_counter() - start)


def _split(flat: list[Tensor], counts: list[int]) -> list[list[Tensor]]:
    it = iter(flat)
    return [[next(it) for _ in range(c)] for c in counts]


def broadcast_stats(
    module_or_stats: StatsArg, src: int = 0, group: dist.ProcessGroup | None = None
) -> SyncReport:
    """Make rank ``src``'s stats the agreed state of every rank of ``group``.

    For state that is one copy of the same data on every rank -- stats warmed up before a
    launcher copied the model to each rank, say -- which a sync would otherwise count once per
    rank. After the layout check, every declared state travels in one float64 broadcast; each
    rank then holds ``src``'s state as data already agreed, so only data added afterwards
    travels at the next :func:`sync_stats`. Without a process group it only settles.

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
    named = named_stats(module_or_stats)
    stats = [s for _, s in named]
    if not _distributed(group):
        for stat in stats:
            stat.settle_()
        return SyncReport(len(stats), 0, 0, time.perf_counter() - start)
    comm = _Collectives(group)
    global_src = src if group is None else dist.get_global_rank(group, src)
    with state_lock(), torch.no_grad():
        _check_ranks(named, [], comm, agreed=False)  # the agreed state is replaced
        bufs = [b for s in stats for n in s.state_names if (b := s._buffers[n]) is not None]
        if bufs:
            flat = torch.cat([b.reshape(-1).to(comm.device, _F64) for b in bufs])
            comm.broadcast(flat, global_src)
            for b, value in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
                b.copy_(value.view(b.shape))
        for stat in stats:
            stat.adopt_state_()  # the received state is the agreed state, as after a load
    return SyncReport(len(stats), comm.calls, comm.n_bytes, time.perf_counter() - start)
