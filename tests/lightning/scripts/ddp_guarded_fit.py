"""2-process DDP fit on CPU under the collective guard: ``ddp_guarded_fit.py OUT_DIR TAG...``.

Lightning's ``strategy="ddp"`` re-runs this script for rank 1. Every collective runs under
``dist_utils.guard_collectives`` (none in a setup hook, every tensor on the group's device and
contiguous). 4001 training rows on 2 ranks; the training step logs no torchmetrics metric, with
``SyncStats(metrics=True)``, ``ActivationStats`` and ``AuditBuffers``.

TAG ``padded``: Lightning's own DistributedSampler (it repeats one row). ``unpadded``: the
user's ``DistributedSampler(drop_last=True)`` with ``use_distributed_sampler=False``. ``gpu``
(the cuda tests): on up to 2 GPUs with NCCL, the training step logging a ``MeanMetric``.
Each rank writes OUT_DIR/TAG_rank{r}.pt.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from dist_utils import guard_collectives
from lit_models import QUIET, TinyModel, make_data
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

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


class LoggedMetric(PaddedData):
    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        from torchmetrics import MeanMetric

        self.train_mean = MeanMetric()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.train_mean.update(batch[1])
        self.log("train_mean", self.train_mean, on_step=False, on_epoch=True)
        return loss


def fit(out_dir: str, tag: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = LoggedMetric(tag) if tag == "gpu" else PaddedData(tag)
    callbacks: list[Any] = [SyncStats(metrics=True), ActivationStats(["net.0"]), AuditBuffers()]
    kwargs: dict[str, Any] = {**QUIET, "devices": 2}
    if tag == "gpu":
        kwargs.update(accelerator="gpu", devices=min(2, torch.cuda.device_count()))
    trainer = pl.Trainer(
        strategy="ddp",
        max_epochs=1,
        use_distributed_sampler=tag != "unpadded",
        callbacks=callbacks,
        default_root_dir=os.path.join(out_dir, tag),
        **kwargs,
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
            "devices": sorted({str(b.device) for b in model.buffers()}
                              | {str(b.device) for s in callbacks[1].all_stats()
                                 for b in s.buffers()}),
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "world_size": trainer.world_size,
        },
        os.path.join(out_dir, f"{tag}_rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    for tag in sys.argv[2:]:
        fit(sys.argv[1], tag)
