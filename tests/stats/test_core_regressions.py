"""Regressions of issues 21 and 22 in the stats core, each against an independent reference."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from dist_utils import run_distributed  # tests/ is on sys.path via its conftest.py
from torch import nn

from statplug import EMAMoments, RunningMinMax, RunningMoments, RunningNorm, sync_stats
from statplug.errors import StatLayoutError


def test_chan_merge_is_written_once() -> None:
    """Every merge goes through statplug.stats.merge.chan_merge (grep of the package)."""
    import pathlib

    import statplug

    root = pathlib.Path(statplug.__file__).parent
    hits = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if any(f in p.read_text() for f in ("n_a * frac", "n_a * n_b / n", "n_a * n_b /"))
    ]
    assert hits == ["stats/merge.py"]


@pytest.mark.parametrize("cls", [RunningMoments, RunningMinMax, EMAMoments])
def test_two_threads_updating_one_stat_lose_no_row(cls: type) -> None:
    stat = cls(8)
    rows = torch.randn(64, 8)

    def feed() -> None:
        for _ in range(500):
            stat.update(rows)

    threads = [threading.Thread(target=feed) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(stat.count) == 2 * 500 * 64
    if cls is RunningMoments:
        ref = rows.double()
        # float32 input: the kernel's float32 sums bound the agreement (about 1e-7)
        torch.testing.assert_close(stat.mean, ref.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stat.var, ref.var(0, unbiased=False), rtol=1e-6, atol=1e-6)


def test_a_float64_mean_keeps_moving_after_3e7_samples() -> None:
    """gymnasium and SB3 keep float64: a float32 mean fed one sample at a time stops moving."""
    stat = RunningMoments(1)  # float64 by default
    state = stat.state_dict()
    state.update(count=torch.tensor(30_000_000), mean=torch.zeros(1, dtype=torch.float64),
                 m2=torch.full((1,), 30_000_000.0, dtype=torch.float64))
    stat.load_state_dict(state)
    for _ in range(2000):
        stat.update(torch.ones(1, 1))
    expected = 2000 / (30_000_000 + 2000)
    assert stat.mean.dtype == torch.float64
    assert stat.mean.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("policy", ["raise", "skip", "propagate"])
def test_finite_input_near_the_float32_maximum_gives_finite_statistics(policy: str) -> None:
    stat = RunningMoments(2, nan_policy=policy)  # type: ignore[arg-type]
    x = torch.full((2, 2), 3e38)
    stat.update(x)
    assert torch.equal(stat.mean, x[0].double())
    assert torch.equal(stat.var, torch.zeros(2, dtype=torch.float64))
    wide = torch.tensor([[1e29], [-1e29]])
    stat = RunningMoments(1, nan_policy=policy)  # type: ignore[arg-type]
    stat.update(wide)
    ref = wide.double().var(unbiased=False).item()  # of the float32 values
    assert stat.var.item() == pytest.approx(ref, rel=1e-12)


def test_eps_zero_maps_a_constant_feature_to_zero_not_nan() -> None:
    norm = RunningNorm(2, eps=0.0)
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]])
    for y in (norm(x), norm.eval()(x)):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y[:, 1], torch.zeros(3))
        ref = (x[:, 0].double() - 2.0) / np.sqrt(2.0 / 3.0)
        torch.testing.assert_close(y[:, 0].double(), ref, rtol=1e-6, atol=1e-6)


def test_jit_trace_of_an_eval_model_with_a_normaliser_passes_trace_checking() -> None:
    model = nn.Sequential(RunningNorm(3, clip=2.0), nn.Linear(3, 2))
    model[0].update(torch.randn(50, 3) * 4 + 1)
    model.eval()
    example = torch.randn(5, 3)
    traced = torch.jit.trace(model, example, check_trace=True, check_inputs=[(example,),
                             (torch.randn(7, 3),)])
    x = torch.randn(9, 3)
    torch.testing.assert_close(traced(x), model(x))


def test_jit_trace_of_a_fresh_normaliser_follows_the_count() -> None:
    """Traced before two samples (the identity), the trace must not bake the identity in."""
    norm = RunningNorm(2).eval()
    traced = torch.jit.trace(norm, torch.randn(4, 2))
    norm.update(torch.tensor([[0.0, 0.0], [2.0, 4.0]]))
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(traced(x), norm(x))
    torch.testing.assert_close(norm(x), torch.zeros(1, 2), atol=1e-4, rtol=0)


def _named_body(rank: int, world: int, swap: bool) -> str:
    a, b = RunningMoments(2), RunningMoments(3)
    a.update(torch.full((4, 2), float(rank)))
    b.update(torch.full((4, 3), float(rank)))
    stats = {"a": a, "b": b} if not (swap and rank == 1) else {"a": b, "b": a}
    try:
        sync_stats(stats)
    except StatLayoutError as err:
        return f"error: {err}"
    return f"ok {int(a.count)} {a.mean.tolist()}"


def test_named_syncs_match_ranks_by_key() -> None:
    assert run_distributed(_named_body, 2, False) == ["ok 8 [0.5, 0.5]"] * 2
    for out in run_distributed(_named_body, 2, True):
        assert out.startswith("error: ") and "first difference" in out


def _one_rank_body(rank: int, world: int) -> tuple[int, int]:
    stat = RunningMoments(3)
    stat.update(torch.randn(8, 3))
    return sync_stats([stat]).n_collectives, int(stat.count)


def test_a_one_rank_group_runs_the_same_collectives() -> None:
    """With a process group, the sync runs its collectives at any world size, so one GPU
    exercises the NCCL path; without one it is a no-op (see the doctest)."""
    ((calls, count),) = run_distributed(_one_rank_body, 1)
    assert calls >= 2 and count == 8
