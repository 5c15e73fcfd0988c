"""2-process Lightning DDP on CPU with every collective under the guard that makes gloo as strict
as NCCL (``dist_utils.guard_collectives``), 4001 training rows (``scripts/ddp_guarded_fit.py``).

Catches: a collective in ``Callback.setup`` (before the strategy moved the model), a metrics sync
with nothing to sync (no torchmetrics metric logged), and sampler padding counted silently.
"""

from __future__ import annotations

from typing import Any

import pytest
from lit_models import run_ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return run_ranks("ddp_guarded_fit.py", tmp_path_factory.mktemp("guarded"), "padded",
                     "unpadded")


def _padding_warnings(res: dict[str, Any]) -> list[str]:
    return [w for w in res["warnings"] if "DistributedSampler repeats" in w]


@pytest.mark.slow
def test_a_guarded_fit_syncs_with_nothing_to_sync_in_metrics(runs) -> None:
    for tag, (r0, r1) in runs.items():
        for res in (r0, r1):
            assert res["n_collectives"] > 0, tag
            assert "n_metrics=0" in res["metrics_report"], res["metrics_report"]
            assert res["audit"] and all(codes == [] for codes in res["audit"]), res["audit"]
        assert r0["count"] == r1["count"]


@pytest.mark.slow
def test_sampler_padding_is_named_once_on_rank_zero(runs) -> None:
    r0, r1 = runs["padded"]
    # Lightning's DistributedSampler pads 4001 rows to 4002: the repeated row is counted.
    assert r0["count"] == r0["target_count"] == r0["activation_count"] == 4002
    (message,) = _padding_warnings(r0)
    assert "repeats 1 row" in message and "drop_last=True" in message
    assert "use_distributed_sampler=False" in message
    assert _padding_warnings(r1) == []  # rank-zero only


@pytest.mark.slow
def test_a_sampler_that_does_not_pad_gives_no_warning(runs) -> None:
    for res in runs["unpadded"]:
        assert res["count"] == 4000 and _padding_warnings(res) == []
