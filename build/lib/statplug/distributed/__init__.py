"""Distributed sync of stats (torch.distributed only)."""

from statplug.distributed.ddp import exclude_from_ddp_broadcast, stat_buffer_names
from statplug.distributed.sync import SyncReport, broadcast_stats, find_stats, sync_stats

__all__ = [
    "SyncReport",
    "broadcast_stats",
    "exclude_from_ddp_broadcast",
    "find_stats",
    "stat_buffer_names",
    "sync_stats",
]
