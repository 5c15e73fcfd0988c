"""Quantiles in Lightning: a QuantileNorm in the model and ActivationStats(quantiles=...)
resume exactly (fit 2N == fit N, save, resume N), load with weights_only, and log q<p>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import QUIET, loader, make_data
from torch import Tensor, nn

from statplug import ActivationStats, QuantileNorm, StatsMixin, SyncStats

pytestmark = pytest.mark.slow
PROBS = (0.01, 0.99)


class QuantileModel(StatsMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.norm = QuantileNorm(4, clip=3.0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(self.norm(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(out: Path, epochs: int, ckpt: str | None = None) -> tuple[QuantileModel, ActivationStats]:
    pl.seed_everything(0, verbose=False)
    model = QuantileModel()
    acts = ActivationStats(["net.0"], quantiles=PROBS)
    trainer = pl.Trainer(
        max_epochs=epochs, default_root_dir=out, deterministic=True,
        callbacks=[SyncStats(), acts, ModelCheckpoint(dirpath=out, filename="last")], **QUIET,
    )
    x, y = make_data(48, loc=3.0, scale=2.0)
    trainer.fit(model, loader(x, y), ckpt_path=ckpt)
    return model, acts


def test_fit_2n_equals_fit_n_then_resume(tmp_path: Path) -> None:
    full, full_acts = _fit(tmp_path / "full", 4)
    _fit(tmp_path / "first", 2)
    ckpt = tmp_path / "first" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # plain types only
    assert int(saved["state_dict"]["norm.sketch.count"]) == 2 * 48
    resumed, res_acts = _fit(tmp_path / "resumed", 4, str(ckpt))

    a, b = full.state_dict(), resumed.state_dict()
    for key in ("norm.sketch.counts", "norm.sketch.min", "norm.sketch.max", "norm.sketch.count"):
        assert torch.equal(a[key], b[key]), key
    assert int(b["norm.sketch.count"]) == 4 * 48
    qa, qb = full_acts.layer_quantiles["net.0"], res_acts.layer_quantiles["net.0"]
    for key, value in qa.state_dict().items():
        assert torch.equal(value, qb.state_dict()[key]), key

    # The sketch holds every epoch's inputs: its quantiles are numpy's within 1%.
    x, _ = make_data(48, loc=3.0, scale=2.0)
    ref = np.quantile(x.double().numpy(), PROBS, axis=0, method="inverted_cdf")
    est = resumed.norm.sketch.quantile(torch.tensor(PROBS, dtype=torch.float64)).numpy()
    assert (np.abs(est - ref) <= 0.01 * np.abs(ref) * (1 + 1e-5)).all()

    loaded = QuantileModel.load_from_checkpoint(ckpt)  # no Trainer
    assert torch.equal(loaded.norm.sketch.counts, saved["state_dict"]["norm.sketch.counts"])


def test_activation_quantiles_are_logged(tmp_path: Path) -> None:
    _, acts = _fit(tmp_path, 1)
    batch = acts.summary()
    q = acts.layer_quantiles["net.0"].quantile(torch.tensor(PROBS, dtype=torch.float64))
    assert torch.equal(batch.scalars["activations/net.0/q0.01"], q[0].min())
    assert torch.equal(batch.scalars["activations/net.0/q0.99"], q[1].max())
    assert "quantiles" in acts.state_key
    with pytest.raises(ValueError, match="ActivationStats: `quantiles`"):
        ActivationStats(quantiles=(0.5, 1.5))


def test_stats_monitor_logs_a_quantile_norm(tmp_path: Path) -> None:
    from statplug import StatsMonitor

    pl.seed_everything(0, verbose=False)
    model = QuantileModel()
    monitor = StatsMonitor()
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[monitor], **QUIET)
    x, y = make_data(48, loc=3.0, scale=2.0)
    trainer.fit(model, loader(x, y))
    logged = monitor.collect(model).read()
    q = model.norm.sketch.quantile(torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
    assert logged["stats/norm.sketch/count"] == 48
    assert logged["stats/norm.sketch/q0.01"] == q[0].min().item()
    assert logged["stats/norm.sketch/q0.5"] == q[1].mean().item()
    assert logged["stats/norm.sketch/q0.99"] == q[2].max().item()
