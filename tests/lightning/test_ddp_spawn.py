"""``strategy="ddp_spawn"`` (2 CPU processes) + SyncStats: the fitted model holds global stats."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lit_models import QUIET, TinyModel, ddp_rank_data, loader
from torch.utils.data import DataLoader

from statplug import SyncStats


class SpawnModel(TinyModel):
    def train_dataloader(self) -> DataLoader:
        x, y, batch_size = ddp_rank_data(self.trainer.global_rank)
        return loader(x, y, batch_size)


@pytest.mark.slow
def test_ddp_spawn_returns_global_stats_to_the_main_process(tmp_path: Path) -> None:
    model = SpawnModel()
    trainer = pl.Trainer(
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        use_distributed_sampler=False,
        callbacks=[SyncStats()],
        default_root_dir=tmp_path,
        **QUIET,
    )
    trainer.fit(model)
    # Lightning copies rank 0's state dict back into this process's model after the spawn.
    x = torch.cat([ddp_rank_data(0)[0], ddp_rank_data(1)[0]]).double()
    assert int(model.norm.count) == 70
    torch.testing.assert_close(model.norm.mean.double(), x.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        model.norm.var.double(), x.var(0, unbiased=False), rtol=1e-5, atol=1e-6
    )
