"""GPU tests: NCCL, CUDA streams, autocast, CUDA graphs. Run with ``pytest -m cuda`` on a machine
with CUDA; skipped (and still collected) without it.

With 2 or more GPUs the distributed tests use 2 NCCL ranks; with one, a single NCCL rank (the
sync runs its collectives at any world size once a process group exists).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_distributed

from statplug import EMAMoments, RunningMinMax, RunningMoments, RunningNorm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

STAT_CLASSES = (RunningMoments, EMAMoments, RunningMinMax)
POLICIES = ("skip", "propagate", "raise")


def _world() -> int:
    return 2 if torch.cuda.device_count() >= 2 else 1


# ------------------------------------------------------------------ NCCL
def _nccl_sync(rank: int, world: int) -> dict[str, Any]:
    from torchmetrics import CatMetric, MaxMetric, MeanMetric

    from statplug import sync_metrics, sync_stats

    device = torch.device("cuda", rank)
    g = torch.Generator(device="cpu").manual_seed(rank)
    data = torch.randn(100 + 37 * rank, 3, generator=g).double() * (1 + rank) + 1e3
    stats = torch.nn.ModuleList([RunningMoments(3), RunningMinMax(3)]).to(device)
    for s in stats:
        s.update(data.to(device).float())
    report = sync_stats(stats)
    metrics = {"mean": MeanMetric(), "max": MaxMetric(), "cat": CatMetric()}
    for m in metrics.values():
        m.to(device)
        m.update(data[:, 0].to(device).float())
    with sync_metrics(metrics) as metrics_report:
        values = {name: m.compute().cpu() for name, m in metrics.items()}
    return {"data": data, "count": int(stats[0].count), "mean": stats[0].mean.cpu().double(),
            "var": stats[0].var.cpu().double(), "max": stats[1].max.cpu().double(),
            "n_collectives": report.n_collectives, "metrics": values,
            "metrics_collectives": metrics_report.n_collectives}


def test_sync_stats_and_sync_metrics_under_nccl() -> None:
    world = _world()
    results = run_distributed(_nccl_sync, world, backend="nccl", timeout=300)
    data = torch.cat([r["data"] for r in results])  # float64 reference over every rank's rows
    for res in results:
        assert res["n_collectives"] > 0 and res["metrics_collectives"] > 0  # the NCCL path ran
        assert res["count"] == data.shape[0]
        torch.testing.assert_close(res["mean"], data.mean(0), rtol=1e-6, atol=0)
        torch.testing.assert_close(res["var"], data.var(0, unbiased=False), rtol=1e-3, atol=0)
        torch.testing.assert_close(res["max"], data.float().double().amax(0))
        col = data[:, 0].float()
        torch.testing.assert_close(res["metrics"]["mean"], col.mean(), rtol=1e-5, atol=0)
        assert res["metrics"]["max"] == col.max()
        assert torch.equal(res["metrics"]["cat"].sort().values, col.sort().values)


def _nccl_big_sync(rank: int, world: int) -> dict[str, Any]:
    """One stat larger than a sync chunk (65536 features), far from 0 so that Chan's second
    phase runs too, synced twice; the last rank holds no sample."""
    from statplug import sync_stats

    device = torch.device("cuda", rank)
    features = 70_000
    g = torch.Generator(device="cpu").manual_seed(rank)
    rows = 0 if rank == world - 1 and world > 1 else 5 + 3 * rank
    data = torch.randn(rows, features, generator=g, dtype=torch.float64) + 1e6
    stat = RunningMoments(features).to(device)
    if rows:
        stat.update(data.to(device))
    first = sync_stats([stat])
    again = sync_stats([stat])  # nothing new: changes nothing
    return {"data": data, "count": int(stat.count), "mean": stat.mean.cpu(),
            "var": stat.var.cpu(), "calls": (first.n_collectives, again.n_collectives)}


def test_a_stat_larger_than_a_sync_chunk_syncs_exactly_under_nccl() -> None:
    """The chunked moments sync (bucket views on the GPU, reduced in place by NCCL) against a
    float64 reference over every rank's rows."""
    results = run_distributed(_nccl_big_sync, _world(), backend="nccl", timeout=300)
    data = torch.cat([r["data"] for r in results])
    for res in results:
        assert res["calls"][0] > 0 and res["count"] == data.shape[0]
        torch.testing.assert_close(res["mean"], data.mean(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(res["var"], data.var(0, unbiased=False), rtol=1e-6, atol=0)


def test_lightning_ddp_fit_on_gpus_with_metrics_and_activation_stats(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lightning"))
    from lit_models import run_ranks

    results = run_ranks("ddp_guarded_fit.py", tmp_path, "gpu", world=_world(), timeout=600)["gpu"]
    for res in results:
        assert res["world_size"] == _world()
        assert all(d.startswith("cuda") for d in res["devices"]), res["devices"]
        assert res["count"] == res["target_count"] == res["activation_count"]
        assert "n_metrics=1" in res["metrics_report"] and "train_mean" in res["logged"]
        assert all(codes == [] for codes in res["audit"])
    assert len({res["logged"]["train_mean"] for res in results}) == 1


# ------------------------------------------------------------------ no stream stalls
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cls", STAT_CLASSES, ids=lambda c: c.__name__)
def test_updates_never_sync_the_stream(cls: type, policy: str) -> None:
    stat = cls(8, nan_policy=policy).cuda()
    x = torch.randn(256, 8, device="cuda")
    stat.update(x)  # first call: allocations and lazy init may read the host once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            stat.update(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(stat.count) == 6 * 256


@pytest.mark.parametrize("policy", POLICIES)
def test_running_norm_train_and_eval_never_sync_the_stream(policy: str) -> None:
    norm = RunningNorm(8, nan_policy=policy).cuda()
    x = torch.randn(64, 8, device="cuda")
    norm(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm(x)
        norm.eval()
        norm(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------ CUDA graphs
def test_compiled_training_loop_with_running_norm_reduce_overhead() -> None:
    torch.manual_seed(0)
    norm = RunningNorm(16, nan_policy="propagate").cuda()
    model = torch.nn.Sequential(norm, torch.nn.Linear(16, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    compiled = torch.compile(step, mode="reduce-overhead")
    batches = [(torch.randn(32, 16, device="cuda") * 3 + 2, torch.randn(32, 1, device="cuda"))
               for _ in range(6)]
    for x, y in batches:
        opt.zero_grad()
        compiled(x, y)
        opt.step()
    data = torch.cat([x for x, _ in batches]).double()
    assert int(norm.moments.count) == data.shape[0]
    torch.testing.assert_close(norm.moments.mean.double(), data.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.moments.var.double(), data.var(0, unbiased=False),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ autocast
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [RunningMoments, RunningMinMax], ids=lambda c: c.__name__)
def test_updates_under_autocast_match_a_float64_reference(cls: type, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    stat = cls(5).cuda()
    linear = torch.nn.Linear(5, 5).cuda()
    seen = []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        for _ in range(4):
            out = linear(torch.randn(64, 5, device="cuda") * 4 + 100)
            assert out.dtype == dtype
            stat.update(out)
            seen.append(out.detach().double())
    data = torch.cat(seen)  # the values the stat saw, exactly, in float64
    assert int(stat.count) == data.shape[0]
    if cls is RunningMoments:
        torch.testing.assert_close(stat.mean.double(), data.mean(0), rtol=1e-6, atol=0)
        torch.testing.assert_close(stat.var.double(), data.var(0, unbiased=False),
                                   rtol=1e-3, atol=0)
    else:
        assert torch.equal(stat.min.double(), data.amin(0))
        assert torch.equal(stat.max.double(), data.amax(0))
