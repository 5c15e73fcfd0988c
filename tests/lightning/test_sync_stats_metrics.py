"""``SyncStats(metrics=True)`` in a 2-process DDP fit on CPU (``scripts/metrics_fit.py``).

The fit logs torchmetrics metrics as ``Metric`` objects (train: MeanMetric, MaxMetric; validation:
MeanSquaredError, BinaryAUROC with list states, a MetricCollection of max/min/sum) on ranks with
different data and validation sets of different sizes. The same fit with plain ``SyncStats()``
(Lightning and torchmetrics sync each metric) is the reference.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lit_models import run_ranks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return run_ranks("metrics_fit.py", tmp_path_factory.mktemp("metrics_fit"), "metrics", "plain")


def test_logged_epoch_values_equal_lightnings_own_sync(fits):
    plain = fits["plain"][0]["logged"]
    keys = {k for entry in plain for k in entry}
    assert {"val_mse", "val_auroc", "val_max", "val_min", "val_sum", "train_mean",
            "train_max"} <= keys
    assert len(plain) == 4  # two epochs: validation and training values each
    for rank in (0, 1):
        # Bit for bit: the same global values on every rank, as Lightning's own sync gives.
        assert fits["metrics"][rank]["logged"] == plain
        assert fits["plain"][rank]["logged"] == plain


def test_each_epoch_end_costs_at_most_eight_collectives_with_the_stats(fits):
    for rank in (0, 1):
        windows = fits["metrics"][rank]["windows"]
        assert [w for w, _ in windows] == ["sanity", "validation", "train", "validation", "train"]
        # The stats' sync (at most 4), then the metrics' own (at most 4).
        assert all(n <= 8 for _, n in windows), windows
        # Lightning's own per-metric sync: a barrier and gathers per state of every metric.
        plain = fits["plain"][rank]["windows"]
        assert all(n_plain > n for (_, n), (_, n_plain) in zip(windows, plain, strict=True)), (
            windows, plain)


def test_stats_unchanged_by_the_extra_syncs(fits):
    for rank in (0, 1):
        ours, ref = fits["metrics"][rank]["stats"], fits["plain"][rank]["stats"]
        assert ours.keys() == ref.keys() and ours
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k
