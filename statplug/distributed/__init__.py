"""Distributed sync of stats (torch.distributed only)."""

from statplug.distributed.ddp import exclude_from_ddp_broadcast, stat_buffer_names
from statplug.distributed.sync import SyncReport, find_stats, sync_stats

__all__ = [
    "SyncReport",
    "exclude_from_ddp_broadcast",
    "find_stats",
    "stat_buffer_names",
    "sync_stats",
]
