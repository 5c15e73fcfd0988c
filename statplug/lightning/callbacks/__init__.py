"""Lightning callbacks, one per file."""

from statplug.lightning.callbacks.activation_stats import ActivationStats
from statplug.lightning.callbacks.audit_buffers import AuditBuffers
from statplug.lightning.callbacks.magnitude_pruning import MagnitudePruning
from statplug.lightning.callbacks.stats_ema_weight_averaging import StatsEMAWeightAveraging
from statplug.lightning.callbacks.stats_monitor import StatsMonitor
from statplug.lightning.callbacks.stats_weight_averaging import StatsWeightAveraging
from statplug.lightning.callbacks.sync_stats import SyncStats

__all__ = [
    "ActivationStats",
    "AuditBuffers",
    "MagnitudePruning",
    "StatsEMAWeightAveraging",
    "StatsMonitor",
    "StatsWeightAveraging",
    "SyncStats",
]
