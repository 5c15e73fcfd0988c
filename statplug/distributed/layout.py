"""What ranks compare before a sync: one description per stat, one layout fingerprint, and the
exact checksum of the agreed state.

:func:`~statplug.sync_stats` exchanges these first; :func:`statplug.audit.check_rank_divergence`
uses the same fingerprint, so a layout differs for the audit exactly when it differs for the sync.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor

from statplug._buffers import dtype_name
from statplug.stats.base import Stat, StatBatch

__all__ = ["agreed_checksum", "describe_stat", "first_difference", "layout_fingerprint"]

# Position weights of the checksum: a quadratic hash of the position, modulo this prime; values
# are summed one period (512 KiB of int64) at a time.
_PRIME = 65521


def describe_stat(stat: Stat, name: str | None = None) -> str:
    """One line naming the stat, its class and shape, and each state's shape and dtype (kept
    on the stat while its name and buffers stay the same: a sync describes every stat)."""
    key = (name, stat.stat_name, *map(id, stat._buffers.values()))
    held = stat.__dict__.get("_statplug_layout")
    if held is not None and held[0] == key:
        return str(held[1])
    text = _describe(stat, name)
    stat.__dict__["_statplug_layout"] = (key, text)
    return text


def _describe(stat: Stat, name: str | None) -> str:
    states = ",".join(
        f"{n}:{tuple(b.shape)}:{dtype_name(b.dtype)}"
        for n in stat.state_names
        if (b := stat._buffers[n]) is not None
    )
    label = stat.stat_name if name is None else name
    where = "" if label == type(stat).__name__ else f"{label} "
    return f"{where}{type(stat).__name__}(shape={stat.shape}) [{states}]"


def layout_fingerprint(
    stats: Iterable[Stat], names: Iterable[str] | None = None
) -> tuple[float, float]:
    """A 62-bit hash of the layout of ``stats`` (in order) as two float64-exact halves."""
    stats = list(stats)
    labels = [None] * len(stats) if names is None else list(names)
    text = "\n".join(describe_stat(s, n) for s, n in zip(stats, labels, strict=True))
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2
    return float(h >> 31), float(h & (2**31 - 1))


def _bits(t: Tensor) -> Tensor:
    """The values' bit patterns as int64 (exact for every dtype a stat holds)."""
    flat = t.detach().reshape(-1)
    if flat.is_floating_point():
        view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()]
        flat = flat.contiguous().view(view)
    return flat.to(torch.int64)


def agreed_checksum(batches: Iterable[StatBatch], device: torch.device) -> Tensor:
    """Float64 ``[4]`` on ``device``: the plain and position-weighted sums of the bit patterns
    of every stat's agreed state (as the batches read it, in float64: exact and one-to-one for
    the counts and floats a stat holds), in wrapping int64 arithmetic, as float64-exact halves.
    Equal on ranks whose agreed states are equal bit for bit, whatever the summation order. The
    sync reuses the batches' reads; they are summed a period of weights at a time, not copied."""
    total = torch.zeros(2, dtype=torch.int64, device=device)
    weights = _weights(device)
    start = 0  # the position of the piece's first value among all the batches' values
    for b in batches:
        for name in b.stats[0].agreed_names():
            flat = _bits(b.agreed(name))
            for lo in range(0, flat.numel(), _PRIME):
                chunk = flat[lo : lo + _PRIME].to(device)
                at = (start + lo) % _PRIME
                w = weights[at : at + chunk.numel()]
                total += torch.stack((chunk.sum(), (chunk * w).sum()))
            start += flat.numel()
    return torch.cat((total >> 32, total & 0xFFFFFFFF)).to(torch.float64)


@functools.cache
def _weights(device: torch.device) -> Tensor:
    """The checksum's position weights, a quadratic hash of the position modulo :data:`_PRIME`
    (so periodic), for two periods: ``[at : at + n]`` are those of ``n <= _PRIME`` consecutive
    positions from one ``at`` positions into a period (2 x 512 KiB, kept per device)."""
    i = torch.arange(_PRIME, device=device)
    w = (i * i % _PRIME * 40503 + i * 9973).remainder_(_PRIME).add_(1)
    return torch.cat((w, w))


def first_difference(layouts: list[list[str]], missing: str) -> tuple[int, str]:
    """Where the ranks' layouts (one list of lines per rank) first differ: the index, and each
    rank's line there (``missing`` where a rank has none), for an error message."""

    def at(lines: list[str], i: int) -> str:
        return lines[i] if i < len(lines) else missing

    n_max = max((len(lines) for lines in layouts), default=0)
    first = next((i for i in range(n_max) if len({at(lines, i) for lines in layouts}) > 1), 0)
    return first, "; ".join(f"rank {r}: {at(lines, first)}" for r, lines in enumerate(layouts))
