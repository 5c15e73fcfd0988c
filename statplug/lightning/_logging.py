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

from statplug._compat import lightning_batches_that_stepped
from statplug.stats import (
    EMAMoments,
    RunningMinMax,
    RunningMoments,
    RunningNorm,
    RunningQuantiles,
    Stat,
)

__all__ = ["Drift", "DriftTracker", "LogBatch", "emit", "log_step", "quantile_readout", "readout"]

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


@dataclass
class Drift:
    """How far a stat moved since the previous log, feature by feature in its own units, so
    features on different scales weigh the same (0-dim tensors)."""

    largest: Tensor  # max over features of |mean - previous mean| / std
    mean: Tensor  # the same, averaged over features
    std: Tensor  # max over features of |std / previous std - 1|


class DriftTracker:
    """The mean and std each stat had at the previous log, to report how far it moved since.

    Its :meth:`state_dict` (plain lists) goes into the owning callback's checkpoint state, so
    the first log after a resume compares with the last one before it.
    """

    def __init__(self) -> None:
        self._previous: dict[str, tuple[Tensor, Tensor]] = {}

    def drift(self, key: str, mean: Tensor, std: Tensor) -> Drift | None:
        """The :class:`Drift` of ``key`` since its previous log (None on the first one)."""
        mean = mean.detach().double().reshape(-1)
        std = std.detach().double().reshape(-1)
        prev = self._previous.get(key)
        self._previous[key] = (mean.clone(), std.clone())
        if prev is None or prev[0].shape != mean.shape:
            return None
        prev_mean, prev_std = (t.to(mean.device) for t in prev)
        moved = (mean - prev_mean).abs() / torch.where(std > 0, std, _UNIT)
        scaled = (std / torch.where(prev_std > 0, prev_std, _UNIT) - 1).abs()
        scaled = torch.where(prev_std > 0, scaled, (std - prev_std).abs())
        return Drift(moved.max(), moved.mean(), scaled.max())

    def reset(self) -> None:
        self._previous.clear()

    def state_dict(self) -> dict[str, dict[str, list[float]]]:
        """Plain Python (``torch.load(weights_only=True)`` reads it): key -> mean, std lists."""
        return {
            key: {"mean": mean.cpu().tolist(), "std": std.cpu().tolist()}
            for key, (mean, std) in self._previous.items()
        }

    def load_state_dict(self, state: dict[str, dict[str, list[float]]]) -> None:
        self._previous = {
            str(key): (
                torch.tensor(entry["mean"], dtype=torch.float64),
                torch.tensor(entry["std"], dtype=torch.float64),
            )
            for key, entry in state.items()
        }


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
    ``drift``, ``drift_mean`` and ``std_drift`` (see :class:`Drift`) for moments and normalisers;
    ``min`` and ``max`` (over features) for min/max stats when ``min_max``. ``vectors`` adds the
    per-feature values for loggers that draw histograms.
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
            s[f"{prefix}/drift"] = moved.largest
            s[f"{prefix}/drift_mean"] = moved.mean
            s[f"{prefix}/std_drift"] = moved.std
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


def log_step(trainer: pl.Trainer, *, epoch_end: bool = False) -> int:
    """The ``step`` Lightning's own rows of this moment carry, so the tables join: the step of
    the running batch, or at the end of a training epoch the step of Lightning's epoch-level
    rows (one less: it logs them with the batch counter stepped back)."""
    stepped = lightning_batches_that_stepped(trainer)
    return max(stepped - 1, 0) if epoch_end else stepped


def emit(
    trainer: pl.Trainer,
    batch: LogBatch,
    *,
    histograms: bool = True,
    prog_bar: Sequence[str] = (),
    epoch_end: bool = False,
) -> dict[str, float]:
    """Log ``batch`` through the Trainer's loggers (rank zero) at Lightning's step.

    Every rank must call this with the same (global) values: each one updates its own
    ``callback_metrics``; only rank zero writes to the loggers. Rows carry ``epoch`` and the
    ``step`` of :func:`log_step` (``epoch_end``: called from ``on_train_epoch_end``), as
    Lightning's own rows do. Keys matching a glob of ``prog_bar`` also go to the progress bar.
    Returns the scalars logged.
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
    step = log_step(trainer, epoch_end=epoch_end)
    row: dict[str, float] = {**metrics, "epoch": trainer.current_epoch}  # an int, as Lightning's
    for logger in trainer.loggers:
        logger.log_metrics(row, step=step)
        logger.save()
    if histograms and batch.vectors:
        _histograms(trainer, batch, step)
    return metrics


def _histograms(trainer: pl.Trainer, batch: LogBatch, step: int) -> None:
    """The per-feature vectors, to every logger that draws histograms (TensorBoard)."""
    for writer in _histogram_writers(trainer):
        for key, values in batch.vectors.items():
            if key.rpartition("/")[0] in batch.empty:
                continue  # a stat with no samples yet
            finite = values.detach().reshape(-1).double().cpu()
            finite = finite[torch.isfinite(finite)]
            if finite.numel():
                writer.add_histogram(key, finite, step)  # type: ignore[attr-defined]


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)
