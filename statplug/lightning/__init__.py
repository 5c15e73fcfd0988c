"""Lightning integration: :class:`StatsMixin` and the callbacks (imports lightning)."""

from statplug.lightning.callbacks import (
    ActivationStats,
    AuditBuffers,
    MagnitudePruning,
    StatsEMAWeightAveraging,
    StatsMonitor,
    StatsWeightAveraging,
    SyncStats,
)
from statplug.lightning.mixin import StatsMixin

__all__ = [
    "ActivationStats",
    "AuditBuffers",
    "MagnitudePruning",
    "StatsEMAWeightAveraging",
    "StatsMixin",
    "StatsMonitor",
    "StatsWeightAveraging",
    "SyncStats",
]
