"""Read stats into loggable numbers and hand them to the Trainer's loggers (private).

Shared by :class:`~statplug.lightning.StatsMonitor` and
:class:`~statplug.lightning.ActivationStats`, so both log the same way:

* values go straight to ``trainer.loggers`` on rank zero, as Lightning's ``LearningRateMonitor``
  does, never through ``self.log``: they are already global (read right after a sync), so
  Lightning must not reduce them again, and it does not warn about ``sync_dist``;
* they are also put in ``trainer.callback_metrics`` (every rank: the values are the same
  everywhere), so a ``ModelCheckpoint`` or ``EarlyStopping`` can monitor them;
* per-feature vectors go to every logger whose experiment has ``add_histogram`` (TensorBoard).

Only the stats' public read-outs (``count``, ``mean``, ``std``, ``min``, ``max``, ``n_skipped``)
are used. Everything is computed on the stats' device and read on the host once per log.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from statplug.stats import (
    EMAMoments,
    RunningMinMax,
    RunningMoments,
    RunningNorm,
    RunningQuantiles,
    Stat,
)

__all__ = ["DriftTracker", "LogBatch", "emit", "quantile_readout", "readout"]

# The quantiles a summary of a sketch reports (as `statplug inspect` does).
SUMMARY_PROBS = (0.01, 0.5, 0.99)

# Features whose std is 0 (a constant pixel) count their raw change of mean as drift.
_UNIT = 1.0


@dataclass
class LogBatch:
    """Scalars (0-dim tensors on any device) and per-feature vectors to log under one step."""

    scalars: dict[str, Tensor] = field(default_factory=dict)
    vectors: dict[str, Tensor] = field(default_factory=dict)
    # Prefixes of stats with a count: one that has seen no sample is left out on read.
    counted: set[str] = field(default_factory=set)
    empty: set[str] = field(default_factory=set)

    def read(self) -> dict[str, float]:
        """Every scalar as a float (one host read for all), stats with no samples left out."""
        if not self.scalars:
            return {}
        # One stack per dtype and device, then one host read: a handful of ops for any number
        # of scalars (a cast per scalar cost ~2 us each).
        groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for key, v in self.scalars.items():
            groups.setdefault((v.dtype, v.device), []).append(key)
        out: dict[str, float] = {}
        for keys in groups.values():
            stacked = torch.stack([self.scalars[k].detach().reshape(()) for k in keys])
            out.update(zip(keys, stacked.double().cpu().tolist(), strict=True))
        out = {k: out[k] for k in self.scalars}  # the order the scalars were added in
        self.empty = {p for p in self.counted if out.get(f"{p}/count") == 0}
        return {k: v for k, v in out.items() if k.rpartition("/")[0] not in self.empty}


class DriftTracker:
    """The mean each stat had at the previous log, to report how far it moved since."""

    def __init__(self) -> None:
        self._previous: dict[str, Tensor] = {}

    def drift(self, key: str, mean: Tensor, std: Tensor) -> Tensor | None:
        """Largest ``|mean - previous mean| / std`` over features (None on the first log)."""
        mean = mean.detach().double().reshape(-1)
        std = std.detach().double().reshape(-1)
        prev = self._previous.get(key)
        self._previous[key] = mean.clone()
        if prev is None or prev.shape != mean.shape:
            return None
        return ((mean - prev).abs() / torch.where(std > 0, std, _UNIT)).max()

    def reset(self) -> None:
        self._previous.clear()


def readout(
    batch: LogBatch,
    prefix: str,
    stat: nn.Module,
    drift: DriftTracker | None = None,
    *,
    min_max: bool = True,
    vectors: bool = True,
) -> None:
    """Add ``stat``'s summary under ``prefix`` (``stats/norm``) to ``batch``.

    ``count`` and ``n_skipped`` for every stat; ``mean`` and ``std`` (averaged over features) and
    ``drift`` (see :class:`DriftTracker`) for moments and normalisers; ``min`` and ``max`` (over
    features) for min/max stats when ``min_max``.
    """
    s = batch.scalars
    if isinstance(stat, Stat | RunningNorm):
        s[f"{prefix}/count"] = stat.count
        s[f"{prefix}/n_skipped"] = stat.n_skipped
        batch.counted.add(prefix)
    if isinstance(stat, RunningMoments | EMAMoments | RunningNorm):
        mean, std = stat.mean, stat.std
        s[f"{prefix}/mean"] = mean.mean()
        s[f"{prefix}/std"] = std.mean()
        moved = drift.drift(prefix, mean, std) if drift is not None else None
        if moved is not None:
            s[f"{prefix}/drift"] = moved
        if vectors:
            batch.vectors[f"{prefix}/mean"] = mean
            batch.vectors[f"{prefix}/std"] = std
    if isinstance(stat, RunningMinMax) and min_max:
        s[f"{prefix}/min"] = stat.min.min()
        s[f"{prefix}/max"] = stat.max.max()
        if vectors:
            batch.vectors[f"{prefix}/min"] = stat.min
            batch.vectors[f"{prefix}/max"] = stat.max
    if isinstance(stat, RunningQuantiles):
        quantile_readout(batch, prefix, stat, SUMMARY_PROBS, vectors=vectors)


def quantile_readout(
    batch: LogBatch,
    prefix: str,
    sketch: RunningQuantiles,
    probs: Sequence[float],
    *,
    vectors: bool = True,
) -> None:
    """Add ``q<p>`` for each probability ``p`` (``stats/norm.sketch/q0.99``): the lowest over
    features for ``p < 0.5``, the highest for ``p > 0.5`` (the range the features span), the
    mean over features for the median."""
    values = sketch.quantile(torch.tensor(list(probs), dtype=torch.float64))
    for p, v in zip(probs, values, strict=True):
        key = f"{prefix}/q{p:g}"
        batch.scalars[key] = v.min() if p < 0.5 else v.max() if p > 0.5 else v.mean()
        if vectors:
            batch.vectors[key] = v


def _histogram_writers(trainer: pl.Trainer) -> list[object]:
    writers = []
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_histogram", None)):
            writers.append(experiment)
    return writers


def emit(
    trainer: pl.Trainer,
    batch: LogBatch,
    *,
    histograms: bool = True,
    prog_bar: Sequence[str] = (),
) -> dict[str, float]:
    """Log ``batch`` through the Trainer's loggers (rank zero) at ``trainer.global_step``.

    Every rank must call this with the same (global) values: each one updates its own
    ``callback_metrics``; only rank zero writes to the loggers. Keys matching a glob of
    ``prog_bar`` also go to the progress bar. Returns the scalars logged.
    """
    metrics = batch.read()
    if not metrics:
        return metrics
    trainer.callback_metrics.update(
        {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}
    )
    if prog_bar:
        shown = {k: v for k, v in metrics.items() if _matches(k, prog_bar)}
        trainer.progress_bar_metrics.update(shown)
    if not trainer.is_global_zero:
        return metrics
    step = trainer.global_step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()
    if histograms and batch.vectors:
        for writer in _histogram_writers(trainer):
            for key, values in batch.vectors.items():
                if key.rpartition("/")[0] in batch.empty:
                    continue  # a stat with no samples yet
                finite = values.detach().reshape(-1).double().cpu()
                finite = finite[torch.isfinite(finite)]
                if finite.numel():
                    writer.add_histogram(key, finite, step)  # type: ignore[attr-defined]
    return metrics


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)
