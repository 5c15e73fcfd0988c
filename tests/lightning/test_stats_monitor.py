"""StatsMonitor on one process: what it logs to CSV and TensorBoard, against float64 references;
ActivationStats' sampling; the callbacks' reprs."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lit_models import QUIET, TinyModel, loader, make_data
from torch import Tensor

from statplug import (
    ActivationStats,
    AuditBuffers,
    EMAMoments,
    MagnitudePruning,
    RunningMinMax,
    RunningMoments,
    StatsMonitor,
    SyncStats,
)

N, BATCH = 32, 8  # 4 steps an epoch


class MonitoredModel(TinyModel):
    """TinyModel (RunningNorm, RandomMask, RunningMoments) plus a min/max and an EMA stat."""

    def __init__(self) -> None:
        super().__init__()
        self.range = RunningMinMax(4)
        self.ema = EMAMoments(4, momentum=0.5)
        self.unused = RunningMoments(3)  # never updated: left out of the logs

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.range.update(x)
            self.ema.update(x)
        return super().forward(x)


def _fit(tmp_path: Path, callbacks: list[Any], logger: Any, epochs: int = 2) -> pl.Trainer:
    kw = {**QUIET, "logger": logger}
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=tmp_path,
                         log_every_n_steps=1, num_sanity_val_steps=0, **kw)
    torch.manual_seed(0)
    trainer.fit(MonitoredModel(), loader(*make_data(N, loc=3.0, scale=2.0), batch_size=BATCH))
    return trainer


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_monitor_writes_every_stat_to_csv_matching_a_float64_reference(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    monitor = StatsMonitor(logging_interval="step", every_n_steps=1)
    _fit(tmp_path, [SyncStats(), monitor], logger)
    rows = [r for r in _csv_rows(logger) if r.get("stats/norm/count")]
    # Every optimizer step, once, at the step Lightning gives that batch's own rows.
    assert [int(r["step"]) for r in rows] == list(range(8))
    x, y = make_data(N, loc=3.0, scale=2.0)
    x, y = x.double(), y.double()
    prev_mean = None
    for i, row in enumerate(rows):
        seen = x[: (i % 4 + 1) * BATCH] if i < 4 else torch.cat([x, x[: (i % 4 + 1) * BATCH]])
        mean, std = seen.mean(0), seen.var(0, unbiased=False).sqrt()
        assert float(row["stats/norm/count"]) == seen.shape[0]
        assert float(row["stats/norm/n_skipped"]) == 0
        torch.testing.assert_close(float(row["stats/norm/mean"]), mean.mean().item(), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(float(row["stats/norm/std"]), std.mean().item(), rtol=1e-5,
                                   atol=1e-6)
        assert float(row["stats/range/min"]) == seen.min().item()
        torch.testing.assert_close(float(row["stats/range/max"]), seen.max().item())
        if prev_mean is None:
            assert row["stats/norm/drift"] == ""  # nothing to compare with at the first log
        else:
            drift = ((mean - prev_mean).abs() / std).max().item()
            torch.testing.assert_close(float(row["stats/norm/drift"]), drift, rtol=1e-4,
                                       atol=1e-6)
        prev_mean = mean
        torch.testing.assert_close(float(row["stats/target_stats/mean"]),
                                   y[: seen.shape[0]].mean().item() if i < 4 else
                                   torch.cat([y, y[: (i % 4 + 1) * BATCH]]).mean().item(),
                                   rtol=1e-5, atol=1e-6)
        assert row["stats/ema/mean"] != "" and row["stats/ema/std"] != ""
        kept = float(row["stats/drop/density"])
        assert kept == pytest.approx(float(MonitoredModel().drop.mask.float().mean()))
    # A stat that saw no sample is not logged; RunningNorm's inner moments are logged once.
    assert not any(k.startswith("stats/unused/") for k in rows[0])
    assert not any(k.startswith("stats/norm.moments/") for k in rows[0])


def test_monitor_epoch_interval_pruning_density_progress_bar_and_callback_metrics(
    tmp_path: Path,
) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    monitor = StatsMonitor(logging_interval="epoch", prog_bar=["stats/norm/drift"])
    trainer = _fit(tmp_path, [SyncStats(), MagnitudePruning(0.5), monitor], logger, epochs=3)
    rows = [r for r in _csv_rows(logger) if r.get("stats/norm/count")]
    assert [float(r["stats/norm/count"]) for r in rows] == [N, 2 * N, 3 * N]
    # Pruning runs at epoch ends: the density reads 1.0 before the first round finishes, then
    # half of net.0's 32 weights are kept.
    densities = [float(r["stats/net.0.weight_mask/density"]) for r in rows]
    assert densities[-1] == pytest.approx(0.5)
    assert "stats/norm/drift" in trainer.progress_bar_metrics
    assert "stats/norm/count" not in trainer.progress_bar_metrics
    assert float(trainer.callback_metrics["stats/norm/count"]) == 3 * N


def test_monitor_and_activation_stats_write_tensorboard_scalars_and_histograms(
    tmp_path: Path,
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callbacks = [SyncStats(), StatsMonitor(logging_interval="epoch"),
                 ActivationStats(["net.0"], log_min_max=True)]
    _fit(tmp_path, callbacks, logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for key in ("stats/norm/count", "stats/norm/mean", "stats/range/max", "stats/drop/density",
                "activations/net.0/mean", "activations/net.0/max"):
        assert key in tags["scalars"], key
    assert [e.value for e in events.Scalars("stats/norm/count")] == [N, 2 * N]
    for key in ("stats/norm/mean", "stats/norm/std", "stats/range/min", "activations/net.0/std"):
        assert key in tags["histograms"], key
    hist = events.Histograms("stats/norm/mean")[-1].histogram_value
    assert hist.num == 4  # one value per feature
    x, _ = make_data(N, loc=3.0, scale=2.0)
    assert hist.min == pytest.approx(x.double().mean(0).min().item(), rel=1e-5)


def test_monitor_without_a_logger_warns_once_and_still_fills_callback_metrics(
    tmp_path: Path,
) -> None:
    with pytest.warns(UserWarning, match="StatsMonitor: the Trainer has no logger"):
        trainer = _fit(tmp_path, [StatsMonitor(logging_interval="epoch")], logger=False, epochs=1)
    assert float(trainer.callback_metrics["stats/target_stats/count"]) == N


class _Linear(pl.LightningModule):
    """One linear layer that never moves (lr 0): its outputs are reproducible after the fit."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_activation_stats_every_n_steps_is_exact_over_the_sampled_steps(tmp_path: Path) -> None:
    cb = ActivationStats(["lin"], every_n_steps=3)
    model = _Linear()
    x, y = make_data(N, loc=3.0, scale=2.0)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], default_root_dir=tmp_path,
                         accumulate_grad_batches=2, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(x, y, batch_size=BATCH))
    # 8 batches, 2 per optimizer step: steps 0..3; step 0 (batches 0, 1) and step 3 (batches 6,
    # 7, i.e. the second epoch's last two) are sampled, whole.
    with torch.no_grad():
        sampled = torch.cat([x[:16], x[16:32]]).double()
        ref = model.lin.double()(sampled)
    moments, minmax = cb.layer_stats["lin"]
    assert int(moments.count) == ref.shape[0] == 32
    torch.testing.assert_close(moments.mean.double(), ref.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moments.var.double(), ref.var(0, unbiased=False), rtol=1e-5,
                               atol=1e-6)
    assert minmax is not None
    torch.testing.assert_close(minmax.max.double(), ref.max(0).values, rtol=1e-6, atol=1e-6)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="`logging_interval` must be 'step' or 'epoch'"):
        StatsMonitor(logging_interval="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`every_n_steps` applies to logging_interval='step'"):
        StatsMonitor(logging_interval="epoch", every_n_steps=5)
    with pytest.raises(ValueError, match="`every_n_steps` must be a positive int"):
        ActivationStats(every_n_steps=0)


def test_callbacks_and_stats_have_reprs_with_their_arguments() -> None:
    assert repr(SyncStats(every_n_train_steps=4)) == (
        "SyncStats(every_n_train_steps=4, metrics=False)"
    )
    assert repr(AuditBuffers("warn")) == "AuditBuffers(on_error='warn')"
    assert repr(StatsMonitor("epoch")) == (
        "StatsMonitor(logging_interval='epoch', every_n_steps=None, histograms=True, "
        "prog_bar=[], prefix='stats')"
    )
    assert repr(ActivationStats(["a.*"], every_n_steps=10)).startswith(
        "ActivationStats(patterns=['a.*'], min_max=True, every_n_steps=10, "
    )
    assert repr(MagnitudePruning(0.3, schedule=[2, 1])) == (
        "MagnitudePruning(amount=0.3, schedule=[1, 2], parameter_names=['weight'], "
        "modules=['Linear', 'Conv2d'], patterns=['*'], scope='layer')"
    )
    from statplug import StatsEMAWeightAveraging, StatsWeightAveraging

    assert repr(StatsWeightAveraging(use_buffers=False)) == (
        "StatsWeightAveraging(device=None, use_buffers=False)"
    )
    assert repr(StatsEMAWeightAveraging(decay=0.99, update_starting_at_step=10)) == (
        "StatsEMAWeightAveraging(device=None, use_buffers=True, decay=0.99, "
        "update_every_n_steps=1, update_starting_at_step=10, update_starting_at_epoch=None)"
    )
    stat = RunningMoments(3)
    stat.update(torch.randn(7, 3))
    assert "count=7" in repr(stat)
