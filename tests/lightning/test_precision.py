"""Stats keep their accumulator dtype and exact counts under Lightning's precision plugins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lit_models import QUIET
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.aggregation import MeanMetric

from statplug import RunningMoments, StatsMixin


class PrecisionModel(StatsMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.stat = RunningMoments(1)
        self.out_stat = RunningMoments(1)  # fed a layer output: low precision under autocast
        self.out_dtypes: set[torch.dtype] = set()
        self.tm_mean = MeanMetric()  # the contrast: torchmetrics' state follows the precision
        self.seen_dtypes: set[torch.dtype] = set()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        self.seen_dtypes.add(x.dtype)
        self.stat.update(x)
        self.tm_mean.update(x)
        out = self.layer(x)
        self.out_dtypes.add(out.dtype)
        self.out_stat.update(out)
        return out.float().square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _data(n: int) -> tuple[Tensor, DataLoader]:
    # Values 1..5 (exact in bf16 and fp16), mean exactly 3.0; batches of 4 samples.
    x = ((torch.arange(n) % 5) + 1).float().unsqueeze(1)
    return x, DataLoader(TensorDataset(x), batch_size=4)


def _fit(precision: str, n: int, tmp_path: Path) -> PrecisionModel:
    model = PrecisionModel()
    _, dl = _data(n)
    kw = {**QUIET, "enable_checkpointing": False}
    trainer = pl.Trainer(max_epochs=1, precision=precision, default_root_dir=tmp_path, **kw)
    trainer.fit(model, dl)
    return model


def test_bf16_true_counts_exactly_where_torchmetrics_saturates(tmp_path: Path) -> None:
    model = _fit("bf16-true", 1200, tmp_path)  # 300 batches of 4
    assert model.seen_dtypes == {torch.bfloat16}  # the plugin really fed bf16
    assert model.layer.weight.dtype == torch.bfloat16
    stat = model.stat
    assert stat.count.dtype == torch.int64 and int(stat.count) == 1200
    assert stat.mean.dtype == torch.float64  # the default accumulator of cumulative moments
    x, _ = _data(1200)
    ref = x.double().mean()
    # float64 state: exact to float64 rounding over 300 updates, not bf16's 0.78.
    assert abs(float(stat.mean) - float(ref)) < 1e-5
    assert abs(float(stat.var) - float(x.double().var(unbiased=False))) < 1e-5
    # torchmetrics' MeanMetric keeps its state in the module dtype: in bf16 its running weight
    # stops growing and the mean drifts far from 3.0.
    tm = float(model.tm_mean.compute())
    assert model.tm_mean.mean_value.dtype == torch.bfloat16
    assert abs(tm - 3.0) > 0.1, tm


@pytest.mark.parametrize("precision", ["16-true", "bf16-mixed", "16-mixed"])
def test_other_precisions_keep_their_float64_accumulators(precision: str, tmp_path: Path) -> None:
    try:
        model = _fit(precision, 200, tmp_path)
    except (ValueError, RuntimeError, NotImplementedError) as err:
        if precision == "16-mixed" and "cpu" in str(err).lower():
            pytest.skip(f"Lightning refuses 16-mixed on CPU: {err}")
        raise
    stat = model.stat
    assert stat.mean.dtype == torch.float64 and stat.m2.dtype == torch.float64
    assert int(stat.count) == 200
    assert abs(float(stat.mean) - 3.0) < 1e-6
    # The plugin (cast or autocast) really ran in low precision. On CPU Lightning runs 16-mixed as
    # bf16-mixed ("AMP with fp16 is not supported on CPU"): it substitutes, it does not refuse.
    low = torch.float16 if precision == "16-true" else torch.bfloat16
    assert model.out_dtypes == {low}
    out = model.out_stat
    assert out.mean.dtype == torch.float64 and int(out.count) == 200
