"""2-process DDP on CPU (Lightning ``strategy="ddp"``), ranks fed different data.

One subprocess runs ``scripts/ddp_fit.py``, which Lightning re-launches for rank 1 (running the
``ddp`` launcher inside pytest would re-run pytest itself). Rank 0 sees 40 samples ~ N(0, 1),
rank 1 30 samples ~ N(5, 2), two epochs each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lit_models import ddp_rank_data, run_script

EPOCHS = 2
STAT_KEYS = ("count", "mean", "m2")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    run_script("ddp_fit.py", str(out), "sync", "nosync", timeout=300)
    return out


def _load(out: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    r0 = torch.load(out / f"{tag}_rank0.pt", weights_only=True)
    r1 = torch.load(out / f"{tag}_rank1.pt", weights_only=True)
    ckpt = torch.load(out / f"{tag}.ckpt", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2
    return r0, r1, ckpt


def _reference(xs: list[torch.Tensor]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """float64 (count, mean, population variance) over every sample of every epoch."""
    data = torch.cat(xs).double()
    return EPOCHS * data.shape[0], data.mean(0), data.var(0, unbiased=False)


def _stat(sd: dict[str, torch.Tensor], prefix: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    count = int(sd[f"{prefix}.count"])
    return count, sd[f"{prefix}.mean"].double(), sd[f"{prefix}.m2"].double() / count


@pytest.mark.slow
def test_sync_stats_gives_every_rank_and_the_checkpoint_the_global_stats(ddp_runs: Path) -> None:
    r0, r1, ckpt = _load(ddp_runs, "sync")
    (x0, y0, _), (x1, y1, _) = ddp_rank_data(0), ddp_rank_data(1)
    expected = {"norm.moments": _reference([x0, x1]), "target_stats": _reference([y0, y1])}
    holders = (("rank 0", r0["model"]), ("rank 1", r1["model"]), ("ckpt", ckpt["state_dict"]))
    for where, sd in holders:
        for prefix, (n, mean, var) in expected.items():
            count, got_mean, got_var = _stat(sd, prefix)
            assert count == n == 140, (where, prefix)
            torch.testing.assert_close(got_mean, mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_var, var, rtol=1e-5, atol=1e-6)
    # Bit-identical on both ranks and in the file.
    for prefix in expected:
        for key in STAT_KEYS:
            k = f"{prefix}.{key}"
            assert torch.equal(r0["model"][k], r1["model"][k]), k
            assert torch.equal(r0["model"][k], ckpt["state_dict"][k]), k
    # Pruning masks are computed from weights DDP keeps identical: identical masks.
    for k in ("net.0.weight_mask", "head.weight_mask"):
        assert torch.equal(r0["model"][k], r1["model"][k])
    # AuditBuffers: the static audit, then a rank-divergence check after each epoch-end sync.
    assert r0["audit"] == r1["audit"] == [[]] * (1 + EPOCHS)
    meta = {s["name"]: s["count"] for s in ckpt["statplug"]["stats"]}
    assert meta == {"norm.moments": 140, "target_stats": 140}


@pytest.mark.slow
def test_activation_stats_are_synced_by_the_callback_itself(ddp_runs: Path) -> None:
    # The callback's stats live outside the model: DDP's broadcast never touches them.
    for tag in ("sync", "nosync"):
        r0, r1, ckpt = _load(ddp_runs, tag)
        layers0, layers1 = r0["activations"]["layers"], r1["activations"]["layers"]
        assert [e["name"] for e in layers0] == [e["name"] for e in layers1] == ["net.0", "head"]
        saved = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ActivationStats"))
        for e0, e1, ec in zip(layers0, layers1, saved["layers"], strict=True):
            for part in ("moments", "minmax"):
                for key, value in e0[part].items():
                    assert torch.equal(value, e1[part][key]), (tag, e0["name"], part, key)
                    assert torch.equal(value, ec[part][key]), (tag, e0["name"], part, key)
            assert int(e0["moments"]["count"]) == EPOCHS * (40 + 30)


@pytest.mark.slow
def test_without_sync_stats_ddp_broadcast_clobbers_rank_1_and_saves_rank_0_only(
    ddp_runs: Path,
) -> None:
    r0, r1, ckpt = _load(ddp_runs, "nosync")
    (x0, _, _), (x1, _, _) = ddp_rank_data(0), ddp_rank_data(1)
    n_global, mean_global, _ = _reference([x0, x1])
    n0, mean0, var0 = _reference([x0])
    _, mean1, _ = _reference([x1])
    # Rank 0 (the broadcast source) and so the checkpoint hold rank 0's data only: 80 of the 140
    # samples, a mean near 0 where the global one is near 2.4.
    for sd in (r0["model"], ckpt["state_dict"]):
        count, mean, var = _stat(sd, "norm.moments")
        assert count == n0 == 80 and n_global == 140
        torch.testing.assert_close(mean, mean0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var, var0, rtol=1e-5, atol=1e-6)
        assert (mean - mean_global).abs().min() > 1.0
    assert ckpt["statplug"]["stats"][0]["count"] == 80
    # Rank 1's stats were overwritten by rank 0's before every training forward: they match
    # neither its own data (mean ~5) nor the global data, nor rank 0.
    count1, mean_r1, _ = _stat(r1["model"], "norm.moments")
    assert (mean_r1 - mean1).abs().min() > 3.0
    assert (mean_r1 - mean_global).abs().min() > 1.0
    assert not torch.equal(r1["model"]["norm.moments.mean"], r0["model"]["norm.moments.mean"])
    assert count1 != n_global
