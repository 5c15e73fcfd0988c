"""Resume exactness: fit 2N epochs == fit N, checkpoint, new process, fit N more from the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lit_models import run_script


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # Bit for bit: SyncStats and ActivationStats settle the stats where checkpoints are written,
    # so the uninterrupted run continues from the same rounded float32 values as the resumed one.
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max abs diff {(a.double() - b.double()).abs().max()}"


@pytest.mark.slow
def test_fit_2n_equals_fit_n_then_resume_n_in_a_new_process(tmp_path: Path) -> None:
    run_script("resume_fit.py", "full,first", str(tmp_path))
    ckpt = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)  # every part is plain
    assert ckpt["global_step"] == 12 and "statplug" in ckpt
    # Written on validation end, before that epoch's pruning round: the resumed run must catch up.
    pruning_state = next(v for k, v in ckpt["callbacks"].items() if "MagnitudePruning" in k)
    assert pruning_state["last_pruned_epoch"] == 0
    run_script("resume_fit.py", "resume", str(tmp_path))  # a fresh interpreter
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)

    model_full, model_res = full["model"], resumed["model"]
    assert model_full.keys() == model_res.keys()
    for key in model_full:
        _assert_same(model_full[key], model_res[key], key)
    # The stats saw all 2N epochs of data, in both runs.
    assert int(model_res["norm.moments.count"]) == 4 * 48
    assert int(model_res["target_stats.count"]) == 4 * 48
    # Pruning happened at every epoch end in both runs (catching up after the resume).
    assert full["pruning"] == resumed["pruning"] == {
        "current_amount": 0.6,
        "last_pruned_epoch": 3,
        "n_rounds": 4,
    }
    mask = model_res["net.0.weight_mask"]
    assert mask.dtype == torch.bool and int((~mask).sum()) == round(0.6 * mask.numel())

    layers_full, layers_res = full["activations"]["layers"], resumed["activations"]["layers"]
    assert [e["name"] for e in layers_full] == [e["name"] for e in layers_res]
    assert [e["name"] for e in layers_res] == ["net.0", "net.1", "head"]
    for ef, er in zip(layers_full, layers_res, strict=True):
        assert ef["feature_dim"] == er["feature_dim"] and ef["n_features"] == er["n_features"]
        for part in ("moments", "minmax"):
            assert ef[part].keys() == er[part].keys()
            for key in ef[part]:
                _assert_same(ef[part][key], er[part][key], f"{ef['name']}.{part}.{key}")
        assert int(er["moments"]["count"]) == 4 * 48
