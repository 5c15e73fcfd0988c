"""statplug: exact, fast, distributed-safe state that a model keeps but does not train."""

from statplug.audit import AuditReport, Finding, audit
from statplug.distributed import SyncReport, exclude_from_ddp_broadcast, sync_stats
from statplug.encodings import RotaryEncoding, SinusoidalEncoding
from statplug.errors import AuditError, CheckpointMismatchError, StatLayoutError, StatplugError
from statplug.masks import CausalMask, RandomMask
from statplug.stats import EMAMoments, RunningMinMax, RunningMoments, RunningNorm, Stat

__version__ = "0.1.0"

__all__ = [
    "AuditError",
    "AuditReport",
    "CausalMask",
    "CheckpointMismatchError",
    "EMAMoments",
    "Finding",
    "RandomMask",
    "RotaryEncoding",
    "RunningMinMax",
    "RunningMoments",
    "RunningNorm",
    "SinusoidalEncoding",
    "Stat",
    "StatLayoutError",
    "StatplugError",
    "SyncReport",
    "audit",
    "exclude_from_ddp_broadcast",
    "sync_stats",
]
