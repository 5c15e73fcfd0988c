"""statplug's logged rows join Lightning's; the drifts survive a resume and ignore feature scales.

References are independent of statplug's logging: Lightning's own rows in the same
``metrics.csv`` (for ``step``/``epoch``), an uninterrupted run (for a resumed one) and float64
arithmetic on the data (for the drifts).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lit_models import QUIET, TinyModel, loader, make_data
from torch import Tensor

from statplug import ActivationStats, RunningMoments, StatsMonitor, SyncStats
from statplug.lightning._logging import DriftTracker, LogBatch, readout

N, BATCH = 40, 8  # 5 steps an epoch
DRIFTS = ("drift", "drift_mean", "std_drift")


class LoggingModel(TinyModel):
    """TinyModel that logs one value per step and one per epoch through ``self.log``."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("per_step", loss.detach(), on_step=True, on_epoch=False)
        self.log("per_epoch", loss.detach(), on_step=False, on_epoch=True)
        return loss


def _fit(root: Path, callbacks: list[Any], epochs: int, ckpt: str | None = None) -> CSVLogger:
    logger = CSVLogger(root, name="csv")
    trainer = pl.Trainer(**{**QUIET, "logger": logger}, max_epochs=epochs, callbacks=callbacks,
                         default_root_dir=root, log_every_n_steps=2, num_sanity_val_steps=0,
                         limit_val_batches=0)
    torch.manual_seed(0)
    model = LoggingModel()
    trainer.fit(model, loader(*make_data(N, loc=3.0, scale=2.0), batch_size=BATCH),
                ckpt_path=ckpt)
    return logger


def _rows(logger: CSVLogger, key: str) -> list[tuple[int, int]]:
    """(epoch, step) of every row holding ``key``."""
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        return [(int(r["epoch"]), int(r["step"])) for r in csv.DictReader(f) if r.get(key)]


def test_epoch_rows_carry_lightnings_epoch_and_step(tmp_path: Path) -> None:
    callbacks = [SyncStats(), StatsMonitor(logging_interval="epoch"),
                 ActivationStats(patterns=["net.0"])]
    logger = _fit(tmp_path, callbacks, epochs=3)
    lightning_rows = _rows(logger, "per_epoch")
    assert lightning_rows == [(0, 4), (1, 9), (2, 14)]  # Lightning's own epoch rows
    assert _rows(logger, "stats/norm/count") == lightning_rows
    assert _rows(logger, "activations/net.0/count") == lightning_rows


def test_step_rows_carry_lightnings_epoch_and_step(tmp_path: Path) -> None:
    callbacks = [SyncStats(), StatsMonitor(logging_interval="step"),
                 ActivationStats(patterns=["net.0"], log_every_n_steps=2)]
    logger = _fit(tmp_path, callbacks, epochs=2)
    lightning_rows = _rows(logger, "per_step")  # every log_every_n_steps=2 steps
    assert lightning_rows == [(0, 1), (0, 3), (1, 5), (1, 7), (1, 9)]
    assert _rows(logger, "stats/norm/count") == lightning_rows
    # ActivationStats also logs at epoch ends, on Lightning's epoch rows.
    assert set(lightning_rows) <= set(_rows(logger, "activations/net.0/count"))


def _drift_rows(logger: CSVLogger) -> dict[int, dict[str, float]]:
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        return {
            int(r["epoch"]): {k: float(r[f"stats/norm/{k}"]) for k in DRIFTS}
            for r in csv.DictReader(f) if r.get("stats/norm/drift")
        }


def test_drift_survives_a_resume(tmp_path: Path) -> None:
    whole = _drift_rows(_fit(tmp_path / "whole", [StatsMonitor(logging_interval="epoch")], 3))
    assert sorted(whole) == [1, 2]

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    _fit(tmp_path / "first", [StatsMonitor(logging_interval="epoch"), saver], 2)
    ckpt = tmp_path / "ckpt" / "epoch=1.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"]["StatsMonitor{'prefix': 'stats'}"]
    assert set(state["drift"]) == {"stats/norm", "stats/target_stats"}

    resumed = _drift_rows(_fit(tmp_path / "resumed", [StatsMonitor(logging_interval="epoch")], 3,
                               ckpt=str(ckpt)))
    assert sorted(resumed) == [2]  # logged at the first log after the resume
    for key in DRIFTS:
        assert resumed[2][key] == pytest.approx(whole[2][key], rel=1e-12, abs=1e-15)


def _drifts(first: Tensor, second: Tensor) -> dict[str, float]:
    stat = RunningMoments(first.shape[1])
    tracker = DriftTracker()
    stat.update(first)
    readout(LogBatch(), "s", stat, tracker)
    stat.update(second)
    batch = LogBatch()
    readout(batch, "s", stat, tracker)
    return {k: v for k, v in batch.read().items() if k.rpartition("/")[2] in DRIFTS}


def test_drifts_are_per_feature_and_scale_free() -> None:
    g = torch.Generator().manual_seed(0)
    first = torch.randn(50, 3, generator=g, dtype=torch.float64)
    second = torch.randn(30, 3, generator=g, dtype=torch.float64) * 1.5 + 0.7
    both = torch.cat([first, second])
    moved = (both.mean(0) - first.mean(0)).abs() / both.std(0, unbiased=False)
    scaled = (both.std(0, unbiased=False) / first.std(0, unbiased=False) - 1).abs()
    got = _drifts(first, second)  # the stat updates with float32 kernels: rel=1e-6
    assert got["s/drift"] == pytest.approx(moved.max().item(), rel=1e-6)
    assert got["s/drift_mean"] == pytest.approx(moved.mean().item(), rel=1e-6)
    assert got["s/std_drift"] == pytest.approx(scaled.max().item(), rel=1e-6)
    # Features a million times apart in scale weigh the same.
    units = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)
    rescaled = _drifts(first * units, second * units)
    for key, value in got.items():
        assert rescaled[key] == pytest.approx(value, rel=1e-6)


def _activation_drift_rows(logger: CSVLogger) -> dict[int, float]:
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        return {
            int(r["epoch"]): float(r["activations/net.0/drift"])
            for r in csv.DictReader(f) if r.get("activations/net.0/drift")
        }


def test_activation_drift_survives_a_resume(tmp_path: Path) -> None:
    def callbacks() -> list:
        return [ActivationStats(patterns=["net.0"])]

    whole = _activation_drift_rows(_fit(tmp_path / "whole", callbacks(), 3))
    assert sorted(whole) == [1, 2]
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    _fit(tmp_path / "first", [*callbacks(), saver], 2)
    resumed = _activation_drift_rows(
        _fit(tmp_path / "resumed", callbacks(), 3, ckpt=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    )
    assert sorted(resumed) == [2]  # logged at the first log after the resume
    assert resumed[2] == pytest.approx(whole[2], rel=1e-12, abs=1e-15)
