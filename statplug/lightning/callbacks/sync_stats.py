r"""
Sync stats
==========

Merge every :class:`~statplug.stats.Stat` of the ``LightningModule`` across ranks at the points
where Lightning reads or saves them, and keep DDP's buffer broadcast from overwriting them in
between.

When it syncs: at the points of :mod:`statplug.lightning.callbacks._sync_schedule`, which
:class:`~statplug.lightning.ActivationStats` shares -- each training epoch end, each validation
start and end, the end of training, and after a training batch when ``every_n_train_steps`` says
so or a step-based ``ModelCheckpoint`` is about to save.

With ``metrics=True`` it also syncs the torchmetrics metrics logged as ``Metric`` objects
(``self.log(name, metric)``) where Lightning would compute them -- the end of each training epoch,
and the end of the last batch of each validation and test run (Lightning computes their epoch
values right after it, before the ``on_*_epoch_end`` hooks) -- right after the stats, in at most
4 collectives of their own (see :func:`~statplug.distributed.sync_metrics`). It computes them
while they hold their global state, so Lightning logs the cached global values and never runs
torchmetrics' per-metric sync; then every metric is back to its local state, as after
torchmetrics' own compute.

Syncing is idempotent (only data added since the previous sync travels), so the extra sync points
never double count, and costs at most 4 collectives whatever the number of stats.

A stat's whole state is its saved buffers, so a run resumed from a checkpoint continues bit for
bit like the uninterrupted run, with nothing to settle at the points where checkpoints are written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from typing_extensions import override

from statplug._compat import lightning_epoch_results, lightning_last_eval_batch
from statplug.distributed import (
    MetricsSyncReport,
    SyncReport,
    broadcast_stats,
    exclude_from_ddp_broadcast,
    exclude_from_fsdp_buffer_cast,
    find_stats,
    stat_buffer_names,
    sync_metrics,
    sync_stats,
)
from statplug.distributed.group import require_group_device
from statplug.errors import IncompatibleCallbackError
from statplug.lightning._utils import leaves, process_group, warn_if_resumed_mid_epoch
from statplug.lightning.callbacks._sync_schedule import SyncPoint, SyncSchedule
from statplug.lightning.callbacks.stats_weight_averaging import stock_averaging_error

__all__ = ["SyncStats"]

log = logging.getLogger(__name__)

# (trainer, pl_module, event) called right after each sync, on every rank.
SyncListener = Callable[["pl.Trainer", "pl.LightningModule", str], None]


class SyncStats(SyncSchedule):
    r"""Merge the module's stats across ranks: every rank, and every checkpoint, holds global stats.

    In ``setup`` (before the strategy wraps the model) it registers every stat buffer in DDP's
    ignore list (:func:`~statplug.distributed.exclude_from_ddp_broadcast`): otherwise DDP copies
    rank 0's buffers over every other rank before each training forward, and each rank's own data
    is lost before it can be merged. Stats created later (in ``configure_model``) are added to the
    wrapped model's ignore set in ``on_fit_start``. Syncs go over the strategy's process group.

    It makes no collective in ``setup``: Lightning calls it before the strategy moves the model to
    its device, and NCCL refuses CPU tensors. Its first collective, a
    :func:`~statplug.distributed.broadcast_stats` that makes rank 0's pre-run stats the agreed
    state, runs in ``on_fit_start`` (or at the start of ``validate``/``test``/``predict``). A stat
    not on the process group's device then raises, naming it. With ``DistributedSampler`` padding
    the training set (its length not a multiple of the world size) it warns once, on rank zero,
    naming the rows counted twice.

    Lightning's ``WeightAveraging`` and ``EMAWeightAveraging`` average or overwrite stats and
    masks: with one of them in the ``Trainer``, ``fit`` stops in ``setup`` (or ``on_fit_start``)
    with :class:`~statplug.errors.IncompatibleCallbackError` naming the replacement
    (:class:`~statplug.StatsWeightAveraging`, :class:`~statplug.StatsEMAWeightAveraging`).

    Under torch FSDP (Lightning's ``FSDPStrategy``, whose precision plugins set FSDP's
    ``buffer_dtype`` to the low precision even for ``"bf16-mixed"``) it keeps every stat buffer out
    of FSDP's buffer cast in ``on_fit_start``, after the wrap and before the checkpoint restore
    and the first forward (:func:`~statplug.distributed.exclude_from_fsdp_buffer_cast`).

    Args:
        every_n_train_steps: also sync after every ``n``-th optimizer step (e.g. when the model
            reads its normaliser's stats in ``training_step`` and should see the global ones).
            Default: None (only at epoch ends, validation and checkpoints).
        metrics: also sync the torchmetrics metrics logged with ``self.log(name, metric)`` in
            the step methods, with the stats, at the epoch ends where Lightning computes them.
            Metrics first logged in the module's own ``on_*_epoch_end`` hooks (and, with several
            validation dataloaders, those of all but the last) are computed by Lightning with
            torchmetrics' own sync, as without this flag. Default: False.

    Example:
        >>> import lightning.pytorch as pl
        >>> from statplug import SyncStats
        >>> trainer = pl.Trainer(callbacks=[SyncStats()], accelerator="cpu", logger=False)
        >>> [type(cb).__name__ for cb in trainer.callbacks][0]
        'SyncStats'
    """

    def __init__(self, every_n_train_steps: int | None = None, metrics: bool = False) -> None:
        if every_n_train_steps is not None and (
            isinstance(every_n_train_steps, bool)
            or not isinstance(every_n_train_steps, int)
            or every_n_train_steps < 1
        ):
            raise ValueError(
                f"SyncStats: `every_n_train_steps` must be a positive int or None, got "
                f"{every_n_train_steps!r}"
            )
        if not isinstance(metrics, bool):
            raise ValueError(f"SyncStats: `metrics` must be a bool, got {metrics!r}")
        super().__init__()
        self.every_n_train_steps = every_n_train_steps
        self.metrics = metrics
        self.excluded: list[str] = []
        self._broadcast_pending = False
        self.n_syncs = 0
        self.last_report: SyncReport | None = None
        self.last_metrics_report: MetricsSyncReport | None = None
        self._listeners: list[SyncListener] = []
        # Lightning reads state_key around every hook call (profiler names): build it once.
        self._state_key = self._generate_state_key(every_n_train_steps=self.every_n_train_steps)

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(every_n_train_steps={self.every_n_train_steps!r}, "
            f"metrics={self.metrics!r})"
        )

    def add_listener(self, fn: SyncListener) -> None:
        """Call ``fn(trainer, pl_module, event)`` on every rank right after each sync."""
        if fn not in self._listeners:
            self._listeners.append(fn)

    def sync(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        event: str,
        *,
        metrics: bool = False,
    ) -> SyncReport:
        """Sync ``pl_module``'s stats now (every rank must call this together).

        With ``metrics``, the logged metrics Lightning is about to compute are synced right
        after the stats and computed.
        """
        group = process_group(trainer)
        require_group_device(find_stats(pl_module), group, "SyncStats")
        if metrics:
            report = self._sync_with_metrics(trainer, pl_module)
        else:
            report = sync_stats(pl_module, group=group)
        self.n_syncs += 1
        self.last_report = report
        log.debug(
            "SyncStats[%s]: %d stats, %d collectives, %d bytes, %.2f ms",
            event,
            report.n_stats,
            report.n_collectives,
            report.n_bytes,
            report.seconds * 1e3,
        )
        for fn in self._listeners:
            fn(trainer, pl_module, event)
        return report

    def _sync_with_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SyncReport:
        pending = lightning_epoch_results(trainer)
        with sync_metrics(
            {key: result.value for key, result in pending.items()},
            group=process_group(trainer),
            stats=pl_module,
        ) as report:
            for result in pending.values():
                # Lightning's wrapper caches the value, so its own epoch-end compute (and
                # torchmetrics' sync inside it) does not run again.
                result.compute()
        self.last_metrics_report = report
        return SyncReport(report.n_stats, report.n_collectives, report.n_bytes, report.seconds)

    # ------------------------------------------------------------------ DDP opt-out
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _refuse_stock_averaging(trainer, pl_module)
        # Callback.setup runs before LightningModule.setup/configure_model and before the strategy
        # wraps the model in DDP, which reads its ignore list only when it is built.
        self.excluded = exclude_from_ddp_broadcast(pl_module)
        log.debug("SyncStats: %d stat buffers excluded from DDP broadcast", len(self.excluded))
        # No collective here: the strategy moves the model to its device only after this hook
        # (an NCCL group refuses the CPU tensors). The first broadcast waits for the stage start.
        self._broadcast_pending = True

    def _broadcast_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What the stats hold before the run (warmed up, or copied by a spawn launcher) is one
        copy of the same data on every rank: rank 0's becomes the agreed state, counted once.

        Runs at the stage's first hook after the strategy setup (``on_fit_start`` for a fit).
        A checkpoint restored later (FSDP, DeepSpeed: ``restore_checkpoint_after_setup``) makes
        its loaded state the agreed one when it loads, so nothing is counted twice either way.
        """
        if not self._broadcast_pending:
            return
        self._broadcast_pending = False
        group = process_group(trainer)
        require_group_device(find_stats(pl_module), group, "SyncStats")
        broadcast_stats(pl_module, group=group)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        warn_if_resumed_mid_epoch(trainer, pl_module, "SyncStats")
        warn_if_sampler_pads(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse_stock_averaging(trainer, pl_module)  # stats built in configure_model count too
        self._broadcast_once(trainer, pl_module)
        wrapped = trainer.strategy.model
        # The strategy has wrapped the model; a checkpoint is restored only after this hook, and
        # FSDP casts buffers at its first forward or load: the one moment to keep stats out.
        self._exclude_from_fsdp_cast(wrapped or pl_module)
        if not isinstance(wrapped, DistributedDataParallel):
            return
        # Stats built in LightningModule.setup or configure_model came after our setup; DDP
        # re-reads `parameters_to_ignore` at every broadcast, so adding them now still works.
        late = [n for n in stat_buffer_names(pl_module) if n not in wrapped.parameters_to_ignore]
        if late:
            wrapped.parameters_to_ignore.update(late)
            # DDP decides whether to broadcast from its cached buffer list: refresh it, or a
            # model whose only buffers are these stats trips DDP's "no tensors" assert.
            wrapped._assign_modules_buffers()
            log.debug("SyncStats: %d late stat buffers excluded from DDP broadcast", len(late))

    @staticmethod
    def _exclude_from_fsdp_cast(model: Any) -> None:
        excluded = exclude_from_fsdp_buffer_cast(model)
        if excluded:
            log.debug("SyncStats: %d stat buffers kept out of FSDP's buffer cast", len(excluded))

    # ------------------------------------------------------------------ sync points
    @property
    def _sync_every_n(self) -> int | None:
        return self.every_n_train_steps

    def _sync_at(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: SyncPoint
    ) -> None:
        metrics = self.metrics and point.event == "train_epoch_end"
        self.sync(trainer, pl_module, point.event, metrics=metrics)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # trainer.validate(): no on_fit_start ran
            self._exclude_from_fsdp_cast(trainer.strategy.model or pl_module)
        self._broadcast_once(trainer, pl_module)
        super().on_validation_start(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._broadcast_once(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._broadcast_once(trainer, pl_module)

    # Lightning computes the epoch values logged in validation/test steps right after the last
    # batch, before any on_*_epoch_end hook: the last batch's end is the last hook before that.
    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.metrics and lightning_last_eval_batch(trainer):
            self.sync(trainer, pl_module, "validation_epoch_end", metrics=True)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.metrics and lightning_last_eval_batch(trainer):
            self.sync(trainer, pl_module, "test_epoch_end", metrics=True)


def _refuse_stock_averaging(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    message = stock_averaging_error(trainer, pl_module)
    if message is not None:
        raise IncompatibleCallbackError(f"SyncStats: {message}")


def sampler_padding(trainer: pl.Trainer) -> int:
    """Rows a ``DistributedSampler`` of the training data repeats per epoch (over all ranks).

    ``DistributedSampler(drop_last=False)``, Lightning's default, pads the dataset to a multiple
    of the world size by repeating its first rows; every stat counts them like new data.
    """
    repeated = 0
    for loader in leaves(trainer.train_dataloader):
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            dataset: Any = sampler.dataset  # sized: DistributedSampler took its len()
            repeated += sampler.total_size - len(dataset)
    return repeated


def warn_if_sampler_pads(trainer: pl.Trainer) -> None:
    """Warn (rank zero) when the training sampler repeats rows the stats will count."""
    repeated = sampler_padding(trainer) if trainer.world_size > 1 else 0
    if repeated:
        rank_zero_warn(
            f"SyncStats: the training set's length is not a multiple of the world size "
            f"({trainer.world_size}), so DistributedSampler repeats {repeated} row"
            f"{'s' if repeated > 1 else ''} per epoch and every stat counts "
            f"{'them' if repeated > 1 else 'it'} again. To count each row once, pass "
            "`DistributedSampler(dataset, drop_last=True)` as the DataLoader's sampler with "
            "`Trainer(use_distributed_sampler=False)` (Lightning's own sampler always pads), "
            "or a sampler that does not pad."
        )
