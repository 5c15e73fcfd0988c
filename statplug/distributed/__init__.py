"""Distributed sync of stats and torchmetrics metrics (torch.distributed only)."""

from statplug.distributed.ddp import exclude_from_ddp_broadcast, stat_buffer_names
from statplug.distributed.fsdp import exclude_from_fsdp_buffer_cast
from statplug.distributed.layout import describe_stat, layout_fingerprint
from statplug.distributed.metrics import MetricsSyncReport, find_metrics, sync_metrics
from statplug.distributed.sync import SyncReport, broadcast_stats, find_stats, sync_stats

__all__ = [
    "MetricsSyncReport",
    "SyncReport",
    "broadcast_stats",
    "describe_stat",
    "exclude_from_ddp_broadcast",
    "exclude_from_fsdp_buffer_cast",
    "find_metrics",
    "find_stats",
    "layout_fingerprint",
    "stat_buffer_names",
    "sync_metrics",
    "sync_stats",
]
