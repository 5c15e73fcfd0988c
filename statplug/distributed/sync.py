"""Exact, coalesced, idempotent merging of stats across ranks: :func:`sync_stats`.

A sync, in order:

1. :func:`find_stats` names the stats (qualified names, dict keys, or positions);
2. :func:`_check_ranks`: one MAX all-reduce of a fixed-size vector -- the layout fingerprint, the
   exact checksum of the agreed state, and whether a rank holds a batch refused on the device.
   Ranks that differ raise :class:`~statplug.errors.StatLayoutError` on every rank, never hang;
3. :class:`_Contribution` of each stat: what it added since the agreed state (``"sum"`` states),
   its extremes (``"min"``/``"max"``), its new data summed around the centre every rank shares
   (``"moments"``: per stat its count, per element two sums, written into the bucket a chunk
   of features at a time). They go in one SUM and one MAX bucket, reduced in place;
4. from the reduced moment sums, the global new data; where its one-phase merge would lose
   more than 10 bits, Chan's second phase: one more SUM of squared deviations about the global
   new mean;
5. results are merged from the buckets, a chunk at a time, and copied into each stat's buffers;
   they become the agreed state.

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
# Moments are worked on at most this many features at a time: the temporaries of a chunk stay
# in cache and the extra memory is the bucket's (see design-notes.md).
_PIECE = 1 << 16
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

    def bucket(self, sizes: list[int]) -> tuple[Tensor, list[Tensor]]:
        """One flat float64 bucket on the group's device, and its consecutive views of ``sizes``."""
        flat = torch.empty(sum(sizes), dtype=_F64, device=self.device)
        return flat, list(flat.split(sizes))

    def reduce_(self, flat: Tensor, op: dist.ReduceOp.RedOpType) -> None:
        """All-reduce the flat bucket in place."""
        for start in range(0, flat.numel(), _CHUNK):
            dist.all_reduce(flat[start : start + _CHUNK], op=op, group=self.group)
            self.calls += 1
        self.n_bytes += flat.numel() * flat.element_size()

    def all_reduce(self, pieces: list[Tensor], op: dist.ReduceOp.RedOpType) -> list[Tensor]:
        """Reduce ``pieces`` (float64, any device) as one flat bucket; returns the reduced
        pieces (views of the bucket, on the group's device)."""
        if not pieces:
            return []
        flat = torch.cat([p.reshape(-1).to(self.device, _F64) for p in pieces])
        self.reduce_(flat, op)
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
class _Piece:
    """A chunk of a batch's moments (:meth:`StatBatch.chunks`) and its views of the SUM bucket:
    this rank's new data summed about the centre every rank shares -- ``n`` per stat, and per
    element ``s1`` = n (mean - centre) and ``s2`` = m2 + n (mean - centre)**2 -- reduced in
    place into every rank's."""

    batch: StatBatch
    n: Tensor
    s1: Tensor
    s2: Tensor
    # Every rank's m2 about the global new mean, when Chan's second phase was taken.
    second: Tensor | None = None

    def per_element(self, per_stat: Tensor) -> Tensor:
        """One value per stat over the moments' elements."""
        return self.batch.per_element(per_stat, *type(self.batch.stats[0]).sync_elements)

    def new_data(self) -> Moments:
        """This rank's new data, from its stats (on their device)."""
        new = type(self.batch.stats[0]).sync_new_data(self.batch)
        assert new is not None
        return new

    def send(self) -> None:
        """Write this rank's new data into the bucket, as sums about the centre."""
        new = self.new_data()
        d = new.mean.to(self.s1.device)
        self.n.copy_(torch.as_tensor(new.n))
        torch.mul(self.per_element(self.n), d, out=self.s1)
        torch.addcmul(new.m2.to(self.s2.device), self.s1, d, out=self.s2)

    def received(self, device: torch.device | None = None) -> Moments:
        """Every rank's new data (its mean about the centre) from the reduced sums, on
        ``device`` (default: the bucket's)."""
        mean = self.s1 / positive(self.per_element(self.n))
        m2 = self.second
        if m2 is None:  # one phase: S2 - S1**2 / n
            m2 = torch.addcmul(self.s2, mean, self.s1, value=-1.0)
        return Moments(self.n.to(device), mean.to(device), m2.to(device))


@dataclass
class _Contribution:
    """What one batch of stats sends (float64, flat), and then receives, in a sync."""

    batch: StatBatch
    sums: dict[str, Tensor] = field(default_factory=dict)  # added since the agreed state
    extremes: dict[str, Tensor] = field(default_factory=dict)  # max, or -min; NaN as -inf
    nans: dict[str, Tensor] = field(default_factory=dict)  # 1.0 where a value is NaN
    chunks: list[StatBatch] = field(default_factory=list)  # of the "moments" state
    totals: dict[str, Tensor] = field(default_factory=dict)  # the sums' views of the bucket
    pieces: list[_Piece] = field(default_factory=list)  # the chunks' views of the bucket

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
        if "moments" in proto._reduces.values():
            c.chunks = batch.chunks(_PIECE)
        return c

    def n_sums(self) -> int:
        """How many values the batch sends in the SUM bucket."""
        elements = type(self.batch.stats[0]).sync_elements
        per_chunk = [len(c.stats) + 2 * sum(c.numel(e) for e in elements) for c in self.chunks]
        return sum(t.numel() for t in self.sums.values()) + sum(per_chunk)

    def send(self, flat: Tensor) -> None:
        """Write the SUM values into ``flat`` (the batch's :meth:`n_sums` values of the bucket):
        the sums, then the moments a chunk at a time; keep the views for the results."""
        elements = type(self.batch.stats[0]).sync_elements
        for name, value in self.sums.items():
            total, flat = flat.split([value.numel(), flat.numel() - value.numel()])
            self.totals[name] = total.view(value.shape)
            total.copy_(value.reshape(-1))
        for chunk in self.chunks:
            k, e = len(chunk.stats), sum(chunk.numel(name) for name in elements)
            n, s1, s2, flat = flat.split([k, e, e, flat.numel() - k - 2 * e])
            self.pieces.append(_Piece(chunk, n, s1, s2))
            self.pieces[-1].send()

    def write_back(self, maxes: list[Tensor]) -> None:
        """Copy the reduced values into the stats; they become their agreed state."""
        batch = self.batch
        device = batch.stats[0].count.device
        for piece in self.pieces:
            type(batch.stats[0]).sync_absorb(piece.batch, piece.received(device))
        for name, total in self.totals.items():
            if not batch.buffers(name)[0].is_floating_point():
                total = total.round()  # integer sums travel as float64: exact below 2**53
            batch.write(name, batch.agreed(name) + total.to(_F64))
        k = len(self.extremes)
        for name, value, nan in zip(self.extremes, maxes[:k], maxes[k:], strict=True):
            sign = 1.0 if self.batch.stats[0]._reduces[name] == "max" else -1.0
            batch.write(name, torch.where(nan > 0, math.nan, value * sign))
        batch.settle()


def _second_phase(pieces: list[_Piece], comm: _Collectives) -> None:
    """Chan's second phase when the one-phase merge of the reduced sums would lose more than 10
    bits somewhere: one more SUM, of every rank's m2 about the global new mean."""
    # False for NaN too; one host read, the same on every rank.
    kept = [(p.received().m2 >= p.s2 * _ONE_PHASE_RATIO).all() for p in pieces]
    if not kept or bool(torch.stack(kept).all()):
        return
    flat, second = comm.bucket([p.s2.numel() for p in pieces])
    for p, out in zip(pieces, second, strict=True):
        new = p.new_data()  # this rank's again (the stats are unchanged so far)
        d = new.mean.to(out.device) - p.received().mean
        n = p.per_element(torch.as_tensor(new.n).to(out.device))
        p.second = torch.addcmul(new.m2.to(out.device), n * d, d, out=out)
    comm.reduce_(flat, dist.ReduceOp.SUM)


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
        flat, views = comm.bucket([p.n_sums() for p in parts])
        for part, view in zip(parts, views, strict=True):
            part.send(view)
        comm.reduce_(flat, dist.ReduceOp.SUM)
        extremes = [[*p.extremes.values(), *p.nans.values()] for p in parts]
        maxes = _split(comm.all_reduce([t for e in extremes for t in e], dist.ReduceOp.MAX),
                       [len(e) for e in extremes])
        _second_phase([piece for p in parts for piece in p.pieces], comm)
        for part, m in zip(parts, maxes, strict=True):
            part.write_back(m)
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
