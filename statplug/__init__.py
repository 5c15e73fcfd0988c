"""statplug: exact, fast, distributed-safe state that a model keeps but does not train."""

from statplug.errors import AuditError, CheckpointMismatchError, StatLayoutError, StatplugError
from statplug.stats import EMAMoments, RunningMinMax, RunningMoments, RunningNorm, Stat

__version__ = "0.1.0"

__all__ = [
    "AuditError",
    "CheckpointMismatchError",
    "EMAMoments",
    "RunningMinMax",
    "RunningMoments",
    "RunningNorm",
    "Stat",
    "StatLayoutError",
    "StatplugError",
]
