"""statplug: exact, fast, distributed-safe state that a model keeps but does not train."""

from typing import TYPE_CHECKING, Any

from statplug.audit import AuditReport, Finding, audit
from statplug.averaging import copy_stats_
from statplug.distributed import (
    MetricsSyncReport,
    SyncReport,
    exclude_from_ddp_broadcast,
    exclude_from_fsdp_buffer_cast,
    sync_metrics,
    sync_stats,
)
from statplug.encodings import RotaryEncoding, SinusoidalEncoding
from statplug.errors import (
    AuditError,
    CheckpointMismatchError,
    IncompatibleCallbackError,
    StatLayoutError,
    StatplugError,
)
from statplug.masks import CausalMask, RandomMask
from statplug.stats import (
    EMAMoments,
    QuantileNorm,
    RunningMinMax,
    RunningMoments,
    RunningNorm,
    RunningQuantiles,
    Stat,
)

__version__ = "0.1.0"

# The Lightning names load lightning (~5 s) on first use only, so `import statplug` stays light.
_LIGHTNING_NAMES = (
    "ActivationStats",
    "AuditBuffers",
    "MagnitudePruning",
    "StatsEMAWeightAveraging",
    "StatsMixin",
    "StatsMonitor",
    "StatsWeightAveraging",
    "SyncStats",
)
# Running recipes needs hydra and the recipes' models: loaded on first use too.
_RECIPE_NAMES = ("RecipeRun", "run_recipe")

if TYPE_CHECKING:
    from statplug.config.run import RecipeRun, run_recipe
    from statplug.lightning import (
        ActivationStats,
        AuditBuffers,
        MagnitudePruning,
        StatsEMAWeightAveraging,
        StatsMixin,
        StatsMonitor,
        StatsWeightAveraging,
        SyncStats,
    )


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES:
        import statplug.lightning

        return getattr(statplug.lightning, name)
    if name in _RECIPE_NAMES:
        import statplug.config.run

        return getattr(statplug.config.run, name)
    raise AttributeError(f"module 'statplug' has no attribute {name!r}")


__all__ = [
    "ActivationStats",
    "AuditBuffers",
    "AuditError",
    "AuditReport",
    "CausalMask",
    "CheckpointMismatchError",
    "EMAMoments",
    "Finding",
    "IncompatibleCallbackError",
    "MagnitudePruning",
    "MetricsSyncReport",
    "QuantileNorm",
    "RandomMask",
    "RecipeRun",
    "RotaryEncoding",
    "RunningMinMax",
    "RunningMoments",
    "RunningNorm",
    "RunningQuantiles",
    "SinusoidalEncoding",
    "Stat",
    "StatLayoutError",
    "StatplugError",
    "StatsEMAWeightAveraging",
    "StatsMixin",
    "StatsMonitor",
    "StatsWeightAveraging",
    "SyncReport",
    "SyncStats",
    "audit",
    "copy_stats_",
    "exclude_from_ddp_broadcast",
    "exclude_from_fsdp_buffer_cast",
    "run_recipe",
    "sync_metrics",
    "sync_stats",
]
