"""Ranks that misbehave never hang their peers or leave ranks silently different (real gloo).

A rank with no stats, a rank that raises before the sync, NaN on one rank with
``nan_policy="propagate"``, and ranks that disagree on the agreed state. Every case runs under
``run_distributed``'s timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_distributed

from statplug import RunningMinMax, RunningMoments, StatLayoutError, sync_stats

pytestmark = pytest.mark.slow


def _no_stats_body(rank: int, world: int) -> str | None:
    stats = [RunningMoments(3)] if rank == 0 else []
    if rank == 0:
        stats[0].update(torch.ones(4, 3))
    try:
        sync_stats(stats)
    except StatLayoutError as err:
        return str(err)
    return None


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_without_stats_raises_on_every_rank_instead_of_hanging(world: int) -> None:
    results = run_distributed(_no_stats_body, world, timeout=60)
    for message in results:
        assert message is not None and "<no stat>" in message and "rank 0" in message


def _all_empty_body(rank: int, world: int) -> int:
    return sync_stats([]).n_collectives


def test_ranks_that_all_hold_no_stats_agree_in_one_collective() -> None:
    assert run_distributed(_all_empty_body, 2, timeout=60) == [1, 1]


def _nan_body(rank: int, world: int, cls_name: str) -> dict:
    cls = {"RunningMinMax": RunningMinMax, "RunningMoments": RunningMoments}[cls_name]
    stat = cls(3, nan_policy="propagate")
    x = torch.arange(12.0).reshape(4, 3) + 10 * rank
    if rank == world - 1:
        x[1, 1] = math.nan
    stat.update(x)
    sync_stats(stat)
    return {k: v.clone() for k, v in stat.state_dict().items()}


@pytest.mark.parametrize("cls_name", ["RunningMinMax", "RunningMoments"])
@pytest.mark.parametrize("world", [2, 3])
def test_nan_on_one_rank_propagates_to_every_rank(cls_name: str, world: int) -> None:
    results = run_distributed(_nan_body, world, cls_name, timeout=60)
    for state in results:
        assert state["count"].item() == 4 * world
        for key in ("min", "max") if cls_name == "RunningMinMax" else ("mean", "m2"):
            value = state[key]
            assert value[1].isnan(), (key, value)  # the NaN column, on every rank
            assert value[0].isfinite() and value[2].isfinite()
        if cls_name == "RunningMinMax":
            assert state["min"][0].item() == 0.0 and state["max"][2].item() == 11 + 10 * (world - 1)
    for state in results[1:]:  # and every rank holds the same state
        for key, value in state.items():
            assert torch.equal(value.isnan(), results[0][key].isnan())
            assert torch.equal(value.nan_to_num(), results[0][key].nan_to_num())


def _raising_rank_body(rank: int, world: int) -> str:
    stat = RunningMoments(3)
    stat.update(torch.ones(2, 3))
    if rank == 1:
        raise RuntimeError("rank 1 failed before its sync")
    # The peer is gone (its process exited): the sync must fail, not wait forever.
    try:
        sync_stats(stat)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def test_a_rank_that_raises_before_the_sync_does_not_hang_its_peer() -> None:
    # A hang would end in run_distributed's TimeoutError (not a RuntimeError) after 90 s. Rank 0's
    # sync errors as soon as the peer's process is gone; the harness then reports a failed rank
    # (rank 0's error at its closing barrier, or rank 1's own).
    with pytest.raises(RuntimeError, match=r"rank [01] failed"):
        run_distributed(_raising_rank_body, 2, timeout=90)
