"""Running statistics held in buffers (pure torch)."""

from statplug.stats.base import NanPolicy, Stat
from statplug.stats.merge import Moments, chan_merge
from statplug.stats.minmax import RunningMinMax
from statplug.stats.moments import EMAMoments, RunningMoments
from statplug.stats.norm import RunningNorm
from statplug.stats.quantiles import QuantileNorm, RunningQuantiles

__all__ = [
    "EMAMoments",
    "Moments",
    "NanPolicy",
    "QuantileNorm",
    "RunningMinMax",
    "RunningMoments",
    "RunningNorm",
    "RunningQuantiles",
    "Stat",
    "chan_merge",
]
