"""2-process DDP fit on CPU under the collective guard: ``ddp_guarded_fit.py OUT_DIR TAG...``.

Lightning's ``strategy="ddp"`` re-runs this script for rank 1. Every collective runs under
``dist_utils.guard_collectives`` (none in a setup hook, every tensor on the group's device and
contiguous). 4001 training rows on 2 ranks; the training step logs no torchmetrics metric, with
``SyncStats(metrics=True)``, ``ActivationStats`` and ``AuditBuffers``.

TAG ``padded``: Lightning's own DistributedSampler (it repeats one row). ``unpadded``: the
user's ``DistributedSampler(drop_last=True)`` with ``use_distributed_sampler=False``.
Each rank writes OUT_DIR/TAG_rank{r}.pt.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lit_models import QUIET, TinyModel, make_data
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dist_utils import guard_collectives

from statplug import ActivationStats, AuditBuffers, SyncStats

ROWS = 4001


class PaddedData(TinyModel):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(*make_data(ROWS, seed=5))
        if self.tag == "unpadded":
            sampler = DistributedSampler(data, shuffle=False, drop_last=True)
            return DataLoader(data, batch_size=500, sampler=sampler)
        return DataLoader(data, batch_size=500, shuffle=False)


def fit(out_dir: str, tag: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = PaddedData(tag)
    callbacks: list[Any] = [SyncStats(metrics=True), ActivationStats(["net.0"]), AuditBuffers()]
    trainer = pl.Trainer(
        devices=2,
        strategy="ddp",
        max_epochs=1,
        use_distributed_sampler=tag == "padded",
        callbacks=callbacks,
        default_root_dir=os.path.join(out_dir, tag),
        **QUIET,
    )
    with warnings.catch_warnings(record=True) as caught, guard_collectives() as calls:
        warnings.simplefilter("always")
        trainer.fit(model)
    torch.save(
        {
            "count": int(model.norm.moments.count),
            "target_count": int(model.target_stats.count),
            "activation_count": int(callbacks[1].layer_stats["net.0"][0].count),
            "warnings": [str(w.message) for w in caught],
            "n_collectives": len(calls),
            "metrics_report": str(callbacks[0].last_metrics_report),
            "audit": [r.codes() for r in callbacks[2].reports],
        },
        os.path.join(out_dir, f"{tag}_rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    for tag in sys.argv[2:]:
        fit(sys.argv[1], tag)
