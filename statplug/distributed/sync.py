"""Coalesced, exact, idempotent merging of stats across ranks: :func:`sync_stats`.

Every stat contributes float64 tensors to at most three coalesced collectives (see
:class:`statplug.stats.Stat`): a SUM of counts and count-weighted sums, a MAX (minima travel
negated), and a second SUM of squared deviations around the global means (Chan's two-phase merge).
A fixed-size layout fingerprint goes first, so ranks holding different stats fail with
:class:`~statplug.errors.StatLayoutError` instead of hanging on mismatched buffer sizes. At most 4
collective calls per sync, whatever the number of stats; the volume is the payload itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from statplug._buffers import name_modules
from statplug.errors import StatLayoutError, StatplugError
from statplug.stats.base import Stat

__all__ = ["SyncReport", "find_stats", "sync_stats"]


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
        name_modules(module_or_stats)
        return [m for m in module_or_stats.modules() if isinstance(m, Stat)]
    stats = list(module_or_stats)
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
    return f"{stat.stat_name} {type(stat).__name__}(shape={stat.shape}) [{states}]"


def _fingerprint(layout: list[str]) -> int:
    digest = hashlib.blake2b("\n".join(layout).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) >> 1  # room to negate safely


def _device_of(stats: list[Stat]) -> torch.device:
    devices = {s._buffers["count"].device for s in stats}  # type: ignore[union-attr]
    if len(devices) > 1:
        raise StatplugError(
            f"sync_stats: stats live on several devices {sorted(map(str, devices))}; move the "
            "model to one device before syncing"
        )
    return devices.pop()


def _check_layout(
    stats: list[Stat], group: dist.ProcessGroup | None, device: torch.device
) -> None:
    layout = [_describe(s) for s in stats]
    fp = _fingerprint(layout)
    t = torch.tensor([fp, -fp], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) == -int(t[1]):  # max == min: every rank holds the same layout
        return
    # Error path only: gather every rank's layout to name the first differing stat.
    world = dist.get_world_size(group)
    layouts: list[list[str] | None] = [None] * world
    dist.all_gather_object(layouts, layout, group=group)
    lists = [lst or [] for lst in layouts]
    def at(lst: list[str], i: int) -> str | None:
        return lst[i] if i < len(lst) else None

    n_max = max(len(lst) for lst in lists)
    first = next((i for i in range(n_max + 1) if len({at(lst, i) for lst in lists}) > 1), 0)
    per_rank = "; ".join(
        f"rank {r}: {at(lst, first) or '<no stat>'}" for r, lst in enumerate(lists)
    )
    raise StatLayoutError(
        f"sync_stats: ranks hold different stat layouts; first difference at stat #{first}: "
        f"{per_rank}. Every rank must build the same stats in the same order (same model and "
        f"config); counts per rank: {[len(lst) for lst in lists]}"
    )


def _split(flat: Tensor, sizes: list[int]) -> list[Tensor]:
    return list(flat.split(sizes)) if sizes else []


def sync_stats(
    module_or_stats: nn.Module | Iterable[Stat], group: dist.ProcessGroup | None = None
) -> SyncReport:
    """Merge every stat across the ranks of ``group``; afterwards each rank holds the global stats.

    Exact (Chan's two-phase merge for moments, MIN/MAX for extrema, count sums), idempotent (only
    data added since the previous sync or load travels, so syncing twice changes nothing and a
    checkpoint loaded on N ranks counts once), and coalesced (at most 4 collectives for any
    number of stats). A no-op returning ``n_collectives == 0`` when ``torch.distributed`` is not
    initialised or the group has one rank.

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
    stats = find_stats(module_or_stats)
    if (
        not stats
        or not dist.is_available()
        or not dist.is_initialized()
        or dist.get_world_size(group) == 1
    ):
        return SyncReport(len(stats), 0, 0, time.perf_counter() - start)
    device = _device_of(stats)
    _check_layout(stats, group, device)
    n_coll, n_bytes = 1, 16

    with torch.no_grad():
        phase1 = [s._sync_phase1() for s in stats]
        sum_parts = [[t.reshape(-1) for t in p[0]] for p in phase1]
        max_parts = [[t.reshape(-1) for t in p[1]] for p in phase1]
        sum_sizes = [t.numel() for parts in sum_parts for t in parts]
        max_sizes = [t.numel() for parts in max_parts for t in parts]
        work = []
        flat_sum = torch.cat([t for parts in sum_parts for t in parts]).to(device, torch.float64)
        work.append(dist.all_reduce(flat_sum, group=group, async_op=True))
        flat_max = None
        if max_sizes:
            flat_max = torch.cat([t for parts in max_parts for t in parts]).to(
                device, torch.float64
            )
            work.append(
                dist.all_reduce(flat_max, op=dist.ReduceOp.MAX, group=group, async_op=True)
            )
        for w in work:
            w.wait()
        n_coll += len(work)
        n_bytes += flat_sum.numel() * 8 + (flat_max.numel() * 8 if flat_max is not None else 0)

        sums_iter = iter(_split(flat_sum, sum_sizes))
        maxes_iter = iter(_split(flat_max, max_sizes) if flat_max is not None else [])
        sums1 = [[next(sums_iter) for _ in parts] for parts in sum_parts]
        maxes = [[next(maxes_iter) for _ in parts] for parts in max_parts]

        phase2 = [
            [t.reshape(-1) for t in s._sync_phase2(s1)]
            for s, s1 in zip(stats, sums1, strict=True)
        ]
        p2_sizes = [t.numel() for parts in phase2 for t in parts]
        sums2: list[list[Tensor]] = [[] for _ in stats]
        if p2_sizes:
            flat2 = torch.cat([t for parts in phase2 for t in parts]).to(device, torch.float64)
            dist.all_reduce(flat2, group=group)
            n_coll += 1
            n_bytes += flat2.numel() * 8
            it2 = iter(_split(flat2, p2_sizes))
            sums2 = [[next(it2) for _ in parts] for parts in phase2]

        for s, s1, mx, s2 in zip(stats, sums1, maxes, sums2, strict=True):
            s._sync_apply(s1, mx, s2)
    return SyncReport(len(stats), n_coll, n_bytes, time.perf_counter() - start)
