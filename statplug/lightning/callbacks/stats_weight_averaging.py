r"""
Stats weight averaging
======================

Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` for models that hold statplug
state: the weights are averaged, the stats and masks are always the live model's.

Lightning's callback keeps a :class:`torch.optim.swa_utils.AveragedModel` (a deep copy made in
``setup``) and treats every buffer like a weight: with ``use_buffers=True`` it averages them (SWA's
average fails on bool buffers, EMA's averages int64 counts), with ``use_buffers=False`` it copies
them at each update, so the copy is stale by the steps since; it swaps all parameters and buffers
between the two models around validation and copies the average into the model at the end. A
buffer registered after ``setup`` (a pruning mask, with ``MagnitudePruning`` listed after the
callback) misaligns them: fit stops on a shape mismatch. This subclass changes only what touches
statplug state (:func:`statplug.averaging.state_buffers`):

* an averaging update never sees it (hidden from ``AveragedModel.update_parameters``, which keeps
  averaging the other buffers when ``use_buffers=True``); right after the update the averaged
  copy receives the live stats and masks (:func:`~statplug.copy_stats_`), buffers it lacks
  included, and its pruned weights are masked with the live masks;
* before the validation swaps, the copy to the model at train end, a checkpoint save and a
  checkpoint load, the averaged copy is brought to the live state the same way, so the swaps and
  the copy move only weights: the model's stats and masks stay exactly as without averaging, and
  the checkpoint's ``state_dict`` (which Lightning fills from the averaged copy) holds them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch import nn
from typing_extensions import override

from statplug.averaging import copy_stats_, state_buffers
from statplug.lightning._utils import callbacks_of, pruning_masks
from statplug.lightning.callbacks.magnitude_pruning import MagnitudePruning

__all__ = ["StatsWeightAveraging", "stock_averaging_error"]

log = logging.getLogger(__name__)


class StatsWeightAveraging(WeightAveraging):
    r"""Weight averaging (SWA by default, or any ``avg_fn``) that keeps the live stats and masks.

    A drop-in replacement for :class:`lightning.pytorch.callbacks.WeightAveraging`, with the same
    arguments and behaviour for the weights (and, with ``use_buffers=True``, for other buffers
    such as BatchNorm's), for models holding statplug stats, random masks, encodings or
    ``MagnitudePruning`` masks. Those are never averaged: validation, the model after ``fit`` and
    every checkpoint use the averaged weights with exactly the stats and masks the same fit
    without averaging ends with. Any order relative to ``MagnitudePruning`` in the callbacks
    works, and so does resuming from a checkpoint.

    Args:
        device: where the averaged copy lives. Default: the model's device.
        use_buffers: also average the buffers that are not statplug state. Default: ``True``.
        kwargs: passed to :class:`torch.optim.swa_utils.AveragedModel` (``avg_fn``,
            ``multi_avg_fn``).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.callbacks import WeightAveraging
        >>> from statplug import StatsWeightAveraging
        >>> averaging = StatsWeightAveraging(use_buffers=False)
        >>> isinstance(averaging, WeightAveraging)
        True
        >>> trainer = pl.Trainer(callbacks=[averaging], accelerator="cpu", logger=False)
    """

    def __repr__(self) -> str:
        # WeightAveraging keeps its arguments as `_device`, `_use_buffers` and `_kwargs`.
        args = [f"device={getattr(self, '_device', None)!r}",
                f"use_buffers={getattr(self, '_use_buffers', True)!r}"]
        args += [f"{k}={v!r}" for k, v in getattr(self, "_kwargs", {}).items()]
        return f"{type(self).__name__}({', '.join(args)})"

    # ------------------------------------------------------------------ averaging updates
    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        before = self._latest_update_step
        with self._state_hidden(pl_module):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._latest_update_step != before:
            self._bring_average_to_live(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = self._latest_update_epoch
        with self._state_hidden(pl_module):
            super().on_train_epoch_end(trainer, pl_module)
        if self._latest_update_epoch != before:
            self._bring_average_to_live(pl_module)

    # ------------------------------------------------------------------ swaps and copies
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._bring_average_to_live(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            # The averaged copy holds the model's own weights now: only the state moves, so a
            # stat the validation steps updated keeps its update through the swap back.
            copy_stats_(self._average_model, pl_module)
        super().on_validation_epoch_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._bring_average_to_live(pl_module)
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning replaces the checkpoint's state_dict with the averaged copy's: it must hold
        # the state the model holds now (synced by SyncStats before any save).
        if self._average_model is not None:
            self._bring_average_to_live(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The averaged copy loads strictly: it needs the buffers registered after it was made.
        if self._average_model is not None:
            copy_stats_(self._average_model, pl_module)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    # ------------------------------------------------------------------ helpers
    def _bring_average_to_live(self, pl_module: nn.Module) -> None:
        """Give the averaged copy the live stats and masks, and mask its pruned weights."""
        average = self._average_model
        assert average is not None
        copy_stats_(average, pl_module)
        with torch.no_grad():
            for key, _, param_name, mask in pruning_masks(pl_module):
                module = average.module.get_submodule(key.rpartition(".")[0])
                param = module._parameters[param_name]
                assert param is not None
                param.mul_(mask.to(param.device))

    @contextmanager
    def _state_hidden(self, pl_module: nn.Module) -> Iterator[None]:
        """Hide the statplug buffers of the model and of the averaged copy from an update.

        ``AveragedModel.update_parameters`` pairs the two models' buffers by position; hiding the
        same names on both sides keeps the other buffers paired (the averaged copy may lack masks
        registered after it was made). The original dicts come back, so buffer order is kept.
        """
        average = self._average_model
        if average is None:
            yield
            return
        hidden: dict[nn.Module, set[str]] = {}
        twins: dict[str, nn.Module | None] = {}
        for entry in state_buffers(pl_module):
            hidden.setdefault(entry.module, set()).add(entry.name)
            if entry.module_name not in twins:
                try:
                    twins[entry.module_name] = average.module.get_submodule(entry.module_name)
                except AttributeError:
                    twins[entry.module_name] = None  # copy_stats_ after the update reports it
            twin = twins[entry.module_name]
            if twin is not None:
                hidden.setdefault(twin, set()).add(entry.name)
        saved = [(mod, mod._buffers) for mod in hidden]
        for mod, names in hidden.items():
            mod.__dict__["_buffers"] = {k: v for k, v in mod._buffers.items() if k not in names}
        try:
            yield
        finally:
            for mod, buffers in saved:
                mod.__dict__["_buffers"] = buffers


def stock_averaging_error(trainer: pl.Trainer, pl_module: nn.Module) -> str | None:
    """The error for a Lightning weight-averaging callback in ``trainer`` that would average
    ``pl_module``'s statplug state (None when there is no such callback or no such state)."""
    callbacks = callbacks_of(trainer)
    stock = [
        cb
        for cb in callbacks
        if isinstance(cb, WeightAveraging) and not isinstance(cb, StatsWeightAveraging)
    ]
    names = [e.qualified_name for e in state_buffers(pl_module)]
    pruning = any(isinstance(cb, MagnitudePruning) for cb in callbacks)
    if not stock or not (names or pruning):
        return None
    cb = stock[0]
    ema = isinstance(cb, EMAWeightAveraging)
    replacement = "statplug.StatsEMAWeightAveraging" if ema else "statplug.StatsWeightAveraging"
    if type(cb) in (WeightAveraging, EMAWeightAveraging):
        fix = f"replace it with {replacement} (same arguments)"
    else:
        fix = f"derive {type(cb).__name__} from {replacement} instead"
    held = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    what = f"{len(names)} statplug buffers ({held})" if names else "MagnitudePruning's masks"
    return (
        f"{type(cb).__name__} would average or overwrite the model's {what}: Lightning's "
        "weight averaging treats every buffer as a weight (averaged counts, masks turned back "
        f"on, stale stats copied back at the end). To average the weights only, {fix}; it "
        "keeps the live stats and masks"
    )
