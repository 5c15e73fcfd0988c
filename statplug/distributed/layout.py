"""The stat layout ranks compare before a sync: one description per stat, one fingerprint.

:func:`~statplug.sync_stats` (and :func:`~statplug.distributed.sync_metrics`) exchange this
fingerprint first; :func:`statplug.audit.check_rank_divergence` uses the same one, so a layout
differs for the audit exactly when it differs for the sync.
"""

from __future__ import annotations

from collections.abc import Iterable

from statplug.distributed.sync import _describe, _fingerprint
from statplug.stats.base import Stat

__all__ = ["describe_stat", "layout_fingerprint"]


def describe_stat(stat: Stat) -> str:
    """One line naming the stat, its class and shape, and each state's shape and dtype."""
    return _describe(stat)


def layout_fingerprint(stats: Iterable[Stat]) -> tuple[float, float]:
    """A 62-bit hash of the layout of ``stats`` (in order), as two float64-exact halves."""
    return _fingerprint([_describe(s) for s in stats])
