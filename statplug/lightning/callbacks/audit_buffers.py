r"""
Audit buffers
=============

Run :func:`statplug.audit.audit` on the ``LightningModule`` and its optimizers before the first
training step, and the runtime checks while it trains:

* ``setup`` and ``on_fit_start``: Lightning's stock ``WeightAveraging``/``EMAWeightAveraging``
  on a model with statplug state, which would average or overwrite it, is an error
  (``stock-weight-averaging``) naming the replacement (``statplug.StatsWeightAveraging`` or
  ``statplug.StatsEMAWeightAveraging``);
* ``on_fit_start`` (optimizers exist, the model is on its device and wrapped, no step has run
  yet): the static audit. With ``on_error="raise"`` an error (a stat or mask in an optimizer, a
  stat registered as a parameter, ...) stops ``fit`` here with
  :class:`~statplug.errors.AuditError` naming every offending tensor.
* at the end of each training epoch: fixed buffers (random masks, encodings, pruning masks between
  pruning rounds) unchanged since the start (``fixed-buffer-mutated``);
* right after each epoch-end sync of a :class:`~statplug.lightning.SyncStats` callback in the same
  ``Trainer`` (only then do all ranks hold the same stats): ``rank-divergence``.

The report table is logged (warning level when there are findings) on rank zero.
"""

from __future__ import annotations

import logging
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from statplug.audit import (
    AuditReport,
    Finding,
    FixedBufferSnapshot,
    audit,
    check_fixed_buffers,
    check_rank_divergence,
    snapshot_fixed_buffers,
)
from statplug.lightning._utils import callbacks_of, process_group
from statplug.lightning.callbacks.magnitude_pruning import MagnitudePruning
from statplug.lightning.callbacks.stats_weight_averaging import stock_averaging_error
from statplug.lightning.callbacks.sync_stats import SyncStats

__all__ = ["AuditBuffers"]

log = logging.getLogger(__name__)

OnError = Literal["raise", "warn", "ignore"]
_ON_ERROR = ("raise", "warn", "ignore")


class AuditBuffers(Callback):
    r"""Audit the module's buffers before training starts, and check them at every epoch end.

    Args:
        on_error: what an audit error does: ``"raise"`` (:class:`~statplug.errors.AuditError`,
            which stops ``fit``), ``"warn"`` (a rank-zero warning with the table) or ``"ignore"``
            (only logged). Warnings are always only logged. Default: ``"raise"``.

    Attributes:
        reports: every :class:`~statplug.audit.AuditReport` made during the run, in order (the
            first is the static audit).

    Example:
        >>> import lightning.pytorch as pl
        >>> from statplug import AuditBuffers, SyncStats
        >>> trainer = pl.Trainer(callbacks=[SyncStats(), AuditBuffers(on_error="warn")],
        ...                      accelerator="cpu", logger=False)
        >>> AuditBuffers("explode")
        Traceback (most recent call last):
        ...
        ValueError: AuditBuffers: `on_error` must be one of ('raise', 'warn', 'ignore'), got ...
    """

    def __init__(self, on_error: OnError = "raise") -> None:
        if on_error not in _ON_ERROR:
            raise ValueError(
                f"AuditBuffers: `on_error` must be one of {_ON_ERROR}, got {on_error!r}"
            )
        self.on_error: OnError = on_error
        self.reports: list[AuditReport] = []
        self._snapshot: FixedBufferSnapshot | None = None
        # Lightning reads state_key around every hook call (profiler names): build it once.
        self._state_key = self._generate_state_key(on_error=self.on_error)

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(on_error={self.on_error!r})"

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Stop as early as possible: Lightning's WeightAveraging already misbehaves when it
        # restores a checkpoint, before on_fit_start. Other policies report it there, in the
        # static audit's report.
        if stage == "fit" and self.on_error == "raise":
            findings = _averaging_findings(trainer, pl_module)
            if findings:
                self._handle(trainer, AuditReport(findings), "at setup")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Optimizers exist from here on, and no training step has run yet.
        report = audit(pl_module, trainer.optimizers)
        averaging = _averaging_findings(trainer, pl_module)
        if averaging:
            report = AuditReport([*report.findings, *averaging])
        self._handle(trainer, report, "before the first training step")
        self._snapshot = snapshot_fixed_buffers(pl_module)
        for cb in callbacks_of(trainer):
            if isinstance(cb, SyncStats):
                cb.add_listener(self._after_sync)
            elif isinstance(cb, MagnitudePruning):
                cb.add_listener(self._around_pruning)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_fixed(trainer, pl_module, f"at the end of epoch {trainer.current_epoch}")

    # ------------------------------------------------------------------ listeners
    def _after_sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str) -> None:
        # Every rank gets here together (SyncStats syncs on every rank), so this collective is
        # safe; only epoch-end syncs are checked, to keep the cost at one collective an epoch.
        if event != "train_epoch_end" or trainer.world_size < 2:
            return
        findings = check_rank_divergence(pl_module, process_group(trainer))
        self._handle(trainer, AuditReport(findings), "right after the epoch-end stat sync")

    def _around_pruning(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str
    ) -> None:
        # A pruning round rewrites the masks on purpose: check everything just before it, then
        # record the new masks as the fixed reference.
        if event == "before_pruning":
            self._check_fixed(trainer, pl_module, "before a pruning round")
        elif event == "after_pruning" and self._snapshot is not None:
            self._snapshot.refresh(pl_module)

    def _check_fixed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        if self._snapshot is None:
            return
        findings: list[Finding] = check_fixed_buffers(pl_module, self._snapshot)
        if findings:
            self._handle(trainer, AuditReport(findings), when)

    def _handle(self, trainer: pl.Trainer, report: AuditReport, when: str) -> None:
        self.reports.append(report)
        if trainer.is_global_zero:
            if report.findings:
                log.warning("statplug audit %s:\n%s", when, report)
            else:
                log.info("statplug audit %s: no findings", when)
        if report.ok or self.on_error == "ignore":
            return
        if self.on_error == "raise":
            report.raise_for_errors()
        rank_zero_warn(
            f"statplug audit {when} found errors:\n{report}\nFix them, or pass "
            "AuditBuffers(on_error='ignore') to silence this warning."
        )


def _averaging_findings(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
    message = stock_averaging_error(trainer, pl_module)
    if message is None:
        return []
    # A callback-level code beside audit()'s codes of DESIGN.md §4 (see docs/design-notes.md).
    return [Finding("stock-weight-averaging", "error", "WeightAveraging", message)]
