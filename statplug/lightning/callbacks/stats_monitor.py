r"""
Stats monitor
=============

Log every stat, normaliser and mask of the ``LightningModule`` through the Trainer's loggers while
it trains, the way Lightning's ``LearningRateMonitor`` logs learning rates.

What is logged, under ``<prefix>/<qualified module name>/`` (``stats/norm/mean``):

========================================  ====================================================
module                                    keys
========================================  ====================================================
``RunningNorm`` (its ``moments`` once)    ``count``, ``n_skipped``, ``mean``, ``std``, drifts
``RunningMoments``, ``EMAMoments``        ``count``, ``n_skipped``, ``mean``, ``std``, drifts
``RunningMinMax``                         ``count``, ``n_skipped``, ``min``, ``max``
``RunningQuantiles``                      ``count``, ``n_skipped``, ``q0.01``, ``q0.5``, ``q0.99``
any other ``Stat``                        ``count``, ``n_skipped``
``RandomMask``, pruning masks              ``density`` (the fraction kept)
========================================  ====================================================

``mean``, ``std`` and ``q0.5`` are averaged over features, ``min``/``max`` and ``q0.01``/``q0.99``
taken over features (the lowest and the highest; a ``QuantileNorm`` is logged through its
``sketch``): raw numbers, dominated by the features of the largest scale. The drifts say how far
a stat moved since the previous log in each feature's own units, so every feature weighs the same
whatever its scale: ``drift`` is the largest change of any feature's mean in units of that
feature's std,
``drift_mean`` the same change averaged over features, ``std_drift`` the largest relative change
of a feature's std (``|std / previous std - 1|``). They are first logged at the second log, and
the previous values are saved in the callback's checkpoint state, so a resumed run logs them at
once. A stat that has seen no sample yet is left out. Where a logger can draw histograms
(TensorBoard's ``add_histogram``), the per-feature ``mean``, ``std``, ``min`` and ``max`` are
logged too.

Every row carries ``epoch`` and the ``step`` Lightning gives its own rows at that moment (at an
epoch end, the step of its epoch-level rows), so statplug's rows join Lightning's in a
``CSVLogger``'s ``metrics.csv``.

The values are global: under DDP every rank first merges the stats
(:func:`~statplug.sync_stats`; idempotent, at most 4 collectives, so it adds nothing to
``SyncStats``' own syncs), then rank zero writes to the loggers. Nothing goes through ``self.log``,
so Lightning neither reduces the values again nor warns about ``sync_dist``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from statplug._buffers import PinnedDtypeModule, named_statplug_modules
from statplug.distributed import sync_stats
from statplug.lightning._logging import DriftTracker, LogBatch, emit, readout
from statplug.lightning._utils import callbacks_of, process_group, pruning_masks
from statplug.lightning.callbacks.sync_stats import SyncStats
from statplug.masks import RandomMask
from statplug.stats import RunningNorm, Stat

__all__ = ["StatsMonitor"]

log = logging.getLogger(__name__)

Interval = Literal["step", "epoch"]
_STATE_VERSION = 1  # of the callback's checkpoint state


class StatsMonitor(Callback):
    r"""Log the model's stats, normalisers and mask densities through the Trainer's loggers.

    Args:
        logging_interval: ``"step"`` (every ``every_n_steps`` optimizer steps) or ``"epoch"``
            (at the end of each training epoch). Default: ``"step"``.
        every_n_steps: with ``logging_interval="step"``, log every ``n`` optimizer steps.
            Default: None (the Trainer's ``log_every_n_steps``).
        histograms: also log per-feature histograms where a logger supports them
            (TensorBoard). Default: True.
        prog_bar: glob patterns of logged keys to show in the progress bar too
            (``["stats/norm/drift"]``). Default: ``()``.
        prefix: of the logged keys. Default: ``"stats"``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from statplug import StatsMonitor, SyncStats
        >>> monitor = StatsMonitor(logging_interval="epoch", prog_bar=["stats/*/drift"])
        >>> monitor
        StatsMonitor(logging_interval='epoch', every_n_steps=None, histograms=True, prog_bar=['stats/*/drift'], prefix='stats')
        >>> trainer = pl.Trainer(callbacks=[SyncStats(), monitor], accelerator="cpu")
    """  # noqa: E501

    def __init__(
        self,
        logging_interval: Interval = "step",
        every_n_steps: int | None = None,
        *,
        histograms: bool = True,
        prog_bar: Sequence[str] = (),
        prefix: str = "stats",
    ) -> None:
        if logging_interval not in ("step", "epoch"):
            raise ValueError(
                "StatsMonitor: `logging_interval` must be 'step' or 'epoch', got "
                f"{logging_interval!r}"
            )
        if every_n_steps is not None:
            if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or (
                every_n_steps < 1
            ):
                raise ValueError(
                    "StatsMonitor: `every_n_steps` must be a positive int or None, got "
                    f"{every_n_steps!r}"
                )
            if logging_interval != "step":
                raise ValueError(
                    "StatsMonitor: `every_n_steps` applies to logging_interval='step'; got "
                    f"logging_interval={logging_interval!r}. Drop `every_n_steps` or log by step"
                )
        if isinstance(prog_bar, str):
            prog_bar = [prog_bar]
        self.logging_interval: Interval = logging_interval
        self.every_n_steps = every_n_steps
        self.histograms = bool(histograms)
        self.prog_bar = list(prog_bar)
        self.prefix = prefix
        self.last_logged: dict[str, float] = {}
        self._drift = DriftTracker()
        self._last_step_logged = -1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(logging_interval={self.logging_interval!r}, "
            f"every_n_steps={self.every_n_steps!r}, histograms={self.histograms!r}, "
            f"prog_bar={self.prog_bar!r}, prefix={self.prefix!r})"
        )

    # ------------------------------------------------------------------ Lightning hooks
    @property
    @override
    def state_key(self) -> str:
        # Two monitors with different prefixes keep their own state in one checkpoint.
        return f"{type(self).__qualname__}{{'prefix': {self.prefix!r}}}"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "drift": self._drift.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        drift = state_dict.get("drift")
        try:
            self._drift.load_state_dict(cast(dict[str, dict[str, list[float]]], drift))
        except (AttributeError, KeyError, TypeError, ValueError):
            rank_zero_warn(
                "StatsMonitor: the checkpoint's state for this callback holds no readable "
                "`drift`; drifts are logged again from the second log after the resume."
            )
            self._drift.reset()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Forgotten after a fit, not at the start of one: a resumed fit restores them first.
        if stage == "fit":
            self._drift.reset()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step_logged = trainer.global_step
        if not trainer.loggers and not self.prog_bar:
            rank_zero_warn(
                "StatsMonitor: the Trainer has no logger and `prog_bar` is empty, so nothing will "
                "be shown (values still reach `trainer.callback_metrics`). Pass a logger to the "
                "Trainer, or remove StatsMonitor to silence this warning."
            )
        if trainer.world_size > 1 and not any(
            isinstance(cb, SyncStats) for cb in callbacks_of(trainer)
        ):
            rank_zero_warn(
                "StatsMonitor: under distributed training without SyncStats, DDP overwrites every "
                "rank's stat buffers with rank 0's before each forward, so the logged values mix "
                "copies of rank 0's data. Add statplug's SyncStats callback."
            )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        if self.logging_interval != "step":
            return
        step = trainer.global_step
        n = self.every_n_steps or int(getattr(trainer, "log_every_n_steps", 50))
        # Once per optimizer step (gradient accumulation runs several batches per step).
        if step == self._last_step_logged or n < 1 or step % n != 0:
            return
        self._last_step_logged = step
        self.log_now(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logging_interval == "epoch":
            self.log_now(trainer, pl_module, epoch_end=True)

    # ------------------------------------------------------------------ logging
    def log_now(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, epoch_end: bool = False
    ) -> dict[str, float]:
        """Sync the module's stats, then log them (every rank must call this together).

        ``epoch_end``: called at the end of a training epoch, so the rows take the step of
        Lightning's epoch-level rows. Default: False (the step of the running batch).
        """
        if trainer.world_size > 1:
            sync_stats(pl_module, group=process_group(trainer))
        batch = self.collect(pl_module)
        self.last_logged = emit(
            trainer, batch, histograms=self.histograms, prog_bar=self.prog_bar,
            epoch_end=epoch_end,
        )
        return self.last_logged

    def collect(self, pl_module: torch.nn.Module) -> LogBatch:
        """The values to log for ``pl_module`` as it is now (no sync, nothing read yet)."""
        batch = LogBatch()
        inside_norm: set[int] = set()
        for name, mod in named_statplug_modules(pl_module, PinnedDtypeModule):
            key = f"{self.prefix}/{name or type(mod).__name__}"
            if isinstance(mod, RunningNorm):
                inside_norm.add(id(mod.moments))
                readout(batch, key, mod, self._drift)
            elif isinstance(mod, Stat) and id(mod) not in inside_norm:
                readout(batch, key, mod, self._drift)
            elif isinstance(mod, RandomMask):
                batch.scalars[f"{key}/density"] = mod.mask.float().mean()
        for buf_name, _, _, mask in pruning_masks(pl_module):
            batch.scalars[f"{self.prefix}/{buf_name}/density"] = mask.float().mean()
        return batch
