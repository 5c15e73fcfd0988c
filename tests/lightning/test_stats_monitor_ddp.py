"""StatsMonitor and ActivationStats logging under 2-process DDP on CPU: once, global, no warning.

``scripts/ddp_fit.py OUT monitor`` fits TinyModel with SyncStats, ActivationStats and an
epoch-interval StatsMonitor, a CSVLogger, and ranks fed different data (rank 0: 40 samples ~
N(0, 1), rank 1: 30 samples ~ N(5, 2)). Each rank records every warning raised during the fit.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lit_models import ddp_rank_data, run_script

EPOCHS = 2


@pytest.fixture(scope="module")
def monitor_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_monitor")
    run_script("ddp_fit.py", str(out), "monitor", timeout=300)
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    files = list(out.glob("monitor/**/metrics.csv"))
    assert len(files) == 1, files  # rank 0 alone writes
    with files[0].open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_monitor_logs_global_values_once_per_epoch(monitor_run: Path) -> None:
    rows = _rows(monitor_run)
    logged = [r for r in rows if r.get("stats/norm/count")]
    assert len(logged) == EPOCHS  # once per epoch, by one rank
    (x0, y0, _), (x1, y1, _) = ddp_rank_data(0), ddp_rank_data(1)
    x = torch.cat([x0, x1]).double()
    y = torch.cat([y0, y1]).double()
    last = logged[-1]
    # Global over both ranks' data (each rank alone would give 80 or 60 samples).
    assert float(last["stats/norm/count"]) == EPOCHS * 70
    assert float(last["stats/target_stats/count"]) == EPOCHS * 70
    torch.testing.assert_close(float(last["stats/norm/mean"]), x.mean(0).mean().item(), rtol=1e-5,
                               atol=1e-6)
    std = x.var(0, unbiased=False).sqrt().mean().item()
    torch.testing.assert_close(float(last["stats/norm/std"]), std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float(last["stats/target_stats/mean"]), y.mean().item(),
                               rtol=1e-5, atol=1e-6)
    assert float(last["stats/drop/density"]) == pytest.approx(0.75, abs=0.2)
    # The same data again in epoch 2: the global mean did not move.
    assert float(last["stats/norm/drift"]) == pytest.approx(0.0, abs=1e-5)
    # ActivationStats logs the same way: global counts, once per epoch.
    act = [r for r in rows if r.get("activations/head/count")]
    assert len(act) == EPOCHS
    assert float(act[-1]["activations/head/count"]) == EPOCHS * 70
    assert float(act[-1]["activations/net.0/min"]) <= float(act[-1]["activations/net.0/max"])



@pytest.mark.slow
def test_no_rank_warns_about_sync_dist(monitor_run: Path) -> None:
    # Regression: ActivationStats logged its (already global) values with ``self.log(...,
    # on_epoch=True)``, and Lightning warned once per key on every rank.
    for rank in (0, 1):
        dump = torch.load(monitor_run / f"monitor_rank{rank}.pt", weights_only=True)
        assert dump["world_size"] == 2
        offending = [w for w in dump["warnings"] if "sync_dist" in w]
        assert offending == [], offending
