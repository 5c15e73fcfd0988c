"""2-process DDP fit on CPU: ``ddp_fit.py OUT_DIR TAG [TAG ...]``, TAG in {sync, nosync, monitor}.

Lightning's ``strategy="ddp"`` re-runs this script for rank 1. Every collective runs under
``dist_utils.guard_collectives`` (as strict as NCCL). Each rank draws data of its own
distribution and size (rank 0: 40 samples ~ N(0, 1), batches of 8; rank 1: 30 samples ~ N(5, 2),
batches of 6; the same number of steps). After each fit every rank dumps its stats to
OUT_DIR/TAG_rank{r}.pt, and the checkpoint goes to OUT_DIR/TAG.ckpt.

``monitor``: SyncStats, ActivationStats and StatsMonitor (epoch interval) with a CSVLogger under
OUT_DIR/monitor; every warning raised during the fit is recorded in the rank's dump.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from dist_utils import guard_collectives
from lightning.pytorch.loggers import CSVLogger
from lit_models import QUIET, TinyModel, ddp_rank_data, loader
from torch.utils.data import DataLoader

from statplug import ActivationStats, AuditBuffers, MagnitudePruning, StatsMonitor, SyncStats

EPOCHS = 2


class RankDataModel(TinyModel):
    def train_dataloader(self) -> DataLoader:
        x, y, batch_size = ddp_rank_data(self.trainer.global_rank)
        return loader(x, y, batch_size)


def fit(out_dir: str, tag: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = RankDataModel()
    callbacks: list[Any] = [ActivationStats(["net.0", "head"]), MagnitudePruning(0.3)]
    if tag == "sync":
        callbacks += [SyncStats(), AuditBuffers()]  # audit: rank divergence after each sync
    kwargs = dict(QUIET)
    if tag == "monitor":
        callbacks = [
            ActivationStats(["net.0", "head"], log_min_max=True),
            SyncStats(),
            StatsMonitor(logging_interval="epoch"),
        ]
        kwargs["logger"] = CSVLogger(out_dir, name="monitor", version=0)
    trainer = pl.Trainer(
        devices=2,
        strategy="ddp",
        max_epochs=EPOCHS,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=os.path.join(out_dir, tag),
        **kwargs,
    )
    with warnings.catch_warnings(record=True) as caught, guard_collectives():
        warnings.simplefilter("always")
        trainer.fit(model)
    trainer.save_checkpoint(os.path.join(out_dir, f"{tag}.ckpt"))  # every rank calls it
    activation = callbacks[0]
    torch.save(
        {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "activations": activation.state_dict(),
            "world_size": trainer.world_size,
            "warnings": [str(w.message) for w in caught],
            "audit": [
                r.codes() for cb in callbacks if isinstance(cb, AuditBuffers) for r in cb.reports
            ],
        },
        os.path.join(out_dir, f"{tag}_rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    for tag in sys.argv[2:]:
        fit(sys.argv[1], tag)
