"""Lightning integration: :class:`StatsMixin` and the callbacks (imports lightning)."""

from statplug.lightning.callbacks import (
    ActivationStats,
    AuditBuffers,
    MagnitudePruning,
    StatsMonitor,
    SyncStats,
)
from statplug.lightning.mixin import StatsMixin

__all__ = [
    "ActivationStats",
    "AuditBuffers",
    "MagnitudePruning",
    "StatsMixin",
    "StatsMonitor",
    "SyncStats",
]
