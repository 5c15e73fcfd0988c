"""When a callback merges stats across ranks: the one schedule of SyncStats and ActivationStats.

Every rank reaches each point, so every rank joins each collective:

* the end of each training epoch (before an epoch-end ``ModelCheckpoint``, which Lightning runs
  after every other callback);
* the start of each validation run, so validation sees the global stats, and its end, so a
  ``ModelCheckpoint`` saving on validation end writes them (Lightning takes the model's
  ``state_dict`` *before* any ``on_save_checkpoint`` hook, so syncing there would be too late);
* after a training batch, once per optimizer step, every ``every_n_train_steps`` steps or when a
  step-based ``ModelCheckpoint`` is about to save at that step;
* the end of training, so a manual ``trainer.save_checkpoint`` after ``fit`` holds global stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from statplug.lightning._utils import checkpoint_due_after_batch

__all__ = ["SyncPoint", "SyncSchedule"]


@dataclass(frozen=True)
class SyncPoint:
    """One point of the schedule.

    Attributes:
        event: the hook, e.g. ``"train_epoch_end"``.
        periodic: an ``every_n_train_steps`` point.
    """

    event: str
    periodic: bool = False


class SyncSchedule(Callback):
    """Calls :meth:`_sync_at` at each point of the schedule (see the module docstring);
    :attr:`_sync_every_n` adds a point every ``n`` optimizer steps."""

    def __init__(self) -> None:
        self._last_step_synced = -1

    @property
    def _sync_every_n(self) -> int | None:
        """Also a point after every ``n``-th optimizer step (None: only before a checkpoint)."""
        return None

    def _sync_at(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: SyncPoint
    ) -> None:
        """Sync now (every rank calls it together)."""
        raise NotImplementedError

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run starts at the checkpoint's step, which was already synced before the save.
        self._last_step_synced = trainer.global_step

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step_synced:
            return  # no step yet, or gradient accumulation: batches share one optimizer step
        n = self._sync_every_n
        periodic = n is not None and step % n == 0
        if periodic or checkpoint_due_after_batch(trainer):
            self._last_step_synced = step
            self._sync_at(trainer, pl_module, SyncPoint("train_batch_end", periodic=periodic))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_at(trainer, pl_module, SyncPoint("validation_start"))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_at(trainer, pl_module, SyncPoint("validation_end"))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_at(trainer, pl_module, SyncPoint("train_epoch_end"))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_at(trainer, pl_module, SyncPoint("train_end"))
