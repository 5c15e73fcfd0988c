"""2-process DDP fit logging torchmetrics metrics: ``metrics_fit.py OUT_DIR TAG [TAG ...]``.

TAG ``metrics`` uses ``SyncStats(metrics=True)``, TAG ``plain`` ``SyncStats()`` (Lightning and
torchmetrics sync each metric themselves). Lightning's ``strategy="ddp"`` re-runs this script for
rank 1. Ranks train on the data of ``ddp_rank_data`` and validate on sets of different sizes.
Every rank records what Lightning logs, and how many ``torch.distributed`` collectives run from
each epoch end (the end of the last validation batch; ``on_train_epoch_end``), before SyncStats'
hook, to the next hook after Lightning computed and logged the epoch's metrics; it writes
OUT_DIR/TAG_rank{r}.pt.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import guard_collectives
from lightning.pytorch.loggers.logger import Logger
from lit_models import QUIET, TinyModel, ddp_rank_data, loader, make_data
from torch.utils.data import DataLoader
from torchmetrics import MaxMetric, MeanMetric, MetricCollection, MinMetric, SumMetric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.regression import MeanSquaredError

from statplug import SyncStats

EPOCHS = 2
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast", "broadcast_object_list", "barrier", "reduce", "gather", "scatter")
CALLS = [0]


def _count_collectives() -> None:
    """Wrap torch.distributed's collectives (they still run) so every call is counted."""
    for name in COLLECTIVES:
        fn = getattr(dist, name)

        def counted(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
            CALLS[0] += 1
            return _fn(*args, **kwargs)

        setattr(dist, name, counted)


class MetricsModel(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.train_mean = MeanMetric()
        self.train_max = MaxMetric()
        self.val_mse = MeanSquaredError()
        self.val_auroc = BinaryAUROC()  # list states: gathered
        self.val_stats = MetricCollection(
            {"max": MaxMetric(), "min": MinMetric(), "sum": SumMetric()}, prefix="val_"
        )

    def train_dataloader(self) -> DataLoader:
        x, y, batch_size = ddp_rank_data(self.trainer.global_rank)
        return loader(x, y, batch_size)

    def val_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        x, y = make_data(23 if rank == 0 else 17, seed=20 + rank, loc=2.0 * rank)
        return loader(x, y, 8 if rank == 0 else 5)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.train_mean.update(loss.detach())
        self.train_max.update(loss.detach())
        self.log("train_mean", self.train_mean, on_step=False, on_epoch=True)
        self.log("train_max", self.train_max, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        pred = self(x)
        self.val_mse.update(pred, y)
        self.val_auroc.update(torch.sigmoid(pred.squeeze(1)), (y.squeeze(1) > 0).long())
        self.val_stats.update(F.l1_loss(pred, y, reduction="none").squeeze(1))
        self.log("val_mse", self.val_mse)
        self.log("val_auroc", self.val_auroc)
        self.log_dict(self.val_stats)


class Recorder(Logger):
    """Keeps every dict of values Lightning logs, on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append(dict(metrics))


class Windows(pl.Callback):
    """Collectives from each epoch end (this callback runs before SyncStats) to the next hook
    after Lightning has computed and logged that epoch's metrics."""

    def __init__(self) -> None:
        self.counts: list[tuple[str, int]] = []
        self._open: tuple[str, int] | None = None

    def _start(self, what: str) -> None:
        self._open = (what, CALLS[0])

    def _stop(self) -> None:
        if self._open is not None:
            what, start = self._open
            self.counts.append((what, CALLS[0] - start))
            self._open = None

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        # Lightning computes the epoch's values right after the last validation batch.
        if trainer._evaluation_loop.batch_progress.is_last_batch:
            self._start("sanity" if trainer.sanity_checking else "validation")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._stop()  # before SyncStats' own sync at validation end

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._start("train")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._stop()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._stop()  # before SyncStats' sync at the end of training


def fit(out_dir: str, tag: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = MetricsModel()
    windows, recorder = Windows(), Recorder()
    trainer = pl.Trainer(
        devices=2,
        strategy="ddp",
        max_epochs=EPOCHS,
        use_distributed_sampler=False,
        callbacks=[windows, SyncStats(metrics=tag == "metrics")],
        default_root_dir=os.path.join(out_dir, tag),
        enable_checkpointing=False,
        **{**QUIET, "logger": recorder},
    )
    with guard_collectives():
        trainer.fit(model)
    torch.save(
        {
            "logged": recorder.logged,
            "windows": windows.counts,
            "stats": {k: v.clone() for k, v in model.state_dict().items() if "moments" in k
                      or "target_stats" in k},
        },
        os.path.join(out_dir, f"{tag}_rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    _count_collectives()
    for tag in sys.argv[2:]:
        fit(sys.argv[1], tag)
