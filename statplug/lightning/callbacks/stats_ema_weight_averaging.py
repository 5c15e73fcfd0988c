r"""
Stats EMA weight averaging
==========================

Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` for models that hold statplug
state: an exponential moving average of the weights, with the live model's stats and masks (see
:class:`~statplug.lightning.callbacks.stats_weight_averaging.StatsWeightAveraging` for what that
changes and why).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from statplug.lightning.callbacks.stats_weight_averaging import StatsWeightAveraging

__all__ = ["StatsEMAWeightAveraging"]


class StatsEMAWeightAveraging(StatsWeightAveraging, EMAWeightAveraging):
    r"""EMA of the weights that keeps the live stats and masks; a drop-in replacement for
    :class:`lightning.pytorch.callbacks.EMAWeightAveraging`.

    The weights (and, with ``use_buffers=True``, buffers that are not statplug state, such as
    BatchNorm's) follow ``EMAWeightAveraging`` exactly; statplug stats, random masks, encodings
    and ``MagnitudePruning`` masks are never averaged: validation, the model after ``fit`` and
    every checkpoint use them exactly as the same fit without averaging ends with.

    Args:
        device: where the averaged copy lives. Default: the model's device.
        use_buffers: also average the buffers that are not statplug state. Default: ``True``.
        decay: the EMA decay. Default: ``0.999``.
        update_every_n_steps: update the average every ``n`` optimizer steps. Default: ``1``.
        update_starting_at_step: first step that updates the average. Default: None.
        update_starting_at_epoch: update at the end of epochs from this one on. Default: None.
        kwargs: passed to :class:`torch.optim.swa_utils.AveragedModel`.

    Example:
        >>> import lightning.pytorch as pl
        >>> from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
        >>> from statplug import StatsEMAWeightAveraging
        >>> ema = StatsEMAWeightAveraging(decay=0.99, update_starting_at_step=10)
        >>> isinstance(ema, EMAWeightAveraging), ema.should_update(step_idx=9)
        (True, False)
        >>> trainer = pl.Trainer(callbacks=[ema], accelerator="cpu", logger=False)
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
            update_starting_at_epoch=update_starting_at_epoch,
            **kwargs,
        )
        self.decay = decay  # EMAWeightAveraging folds it into its avg_fn: kept for the repr

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self._device!r}, use_buffers={self._use_buffers!r}, "
            f"decay={self.decay!r}, update_every_n_steps={self.update_every_n_steps!r}, "
            f"update_starting_at_step={self.update_starting_at_step!r}, "
            f"update_starting_at_epoch={self.update_starting_at_epoch!r})"
        )
