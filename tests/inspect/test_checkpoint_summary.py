"""Recognising stats, masks and buffers from a checkpoint's key layout alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from statplug import EMAMoments, RandomMask, RunningMinMax, RunningMoments, RunningNorm
from statplug.config import ConfigError
from statplug.inspect.checkpoint import format_table, summarize, summarize_file
from statplug.inspect.plotting import plot_summary


def _model() -> nn.Module:
    model = nn.Module()
    model.norm = RunningNorm(4)
    model.ema = EMAMoments(3, momentum=0.5)
    model.range = RunningMinMax(3)
    model.drop = RandomMask((2, 5), 0.5, seed=1)
    model.bn = nn.BatchNorm1d(3)
    model.fc = nn.Linear(4, 3)
    model.fc.register_buffer("weight_mask", torch.ones(3, 4, dtype=torch.bool).tril())
    x = torch.randn(50, 4) * 3 + 1
    model.norm(x)
    model.ema.update(x[:, :3])
    model.range.update(x[:, :3])
    return model


def test_every_kind_is_recognised_from_a_bare_state_dict() -> None:
    summary = summarize({"state_dict": _model().state_dict()}, "mem")
    by_name = {e.name: e for e in summary.entries}
    assert (by_name["norm.moments"].kind, by_name["norm.moments"].count) == ("RunningMoments", 50)
    assert by_name["ema"].kind == "EMAMoments" and by_name["ema"].count == 50
    assert by_name["range"].kind == "RunningMinMax"
    assert by_name["drop"].kind == "RandomMask" and by_name["drop"].group == "mask"
    assert by_name["fc.weight_mask"].kind == "pruning mask"
    assert by_name["fc.weight_mask"].summary["pruned"] == 6  # 3x4 lower triangle keeps 6
    assert by_name["bn.running_mean"].group == "buffer"
    assert by_name["bn.num_batches_tracked"].group == "buffer"
    # fc.weight, fc.bias, bn.weight, bn.bias: parameters, counted but not listed.
    assert summary.n_parameters == 4
    assert "fc.weight" not in by_name


def test_summary_values_match_the_stats() -> None:
    model = _model()
    summary = summarize({"state_dict": model.state_dict()})
    moments = next(e for e in summary.entries if e.name == "norm.moments")
    assert moments.summary["mean"] == pytest.approx(float(model.norm.mean.mean()), rel=1e-5)
    assert moments.arrays["std"] == pytest.approx(model.norm.std.tolist(), rel=1e-5)
    mm = next(e for e in summary.entries if e.name == "range")
    assert mm.summary["min"] == pytest.approx(float(model.range.min.min()))
    table = format_table(summary)
    assert "norm.moments" in table and "RunningMoments" in table and "50" in table


def test_callback_state_stats_are_found() -> None:
    stat = RunningMoments(2)
    stat.update(torch.randn(7, 2))
    ckpt = {
        "state_dict": {},
        "callbacks": {
            "ActivationStats{'patterns': ['*']}": {
                "layers": [{"name": "encoder.fc", "moments": dict(stat.state_dict())}]
            },
            "ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5)},
        },
    }
    names = [(e.name, e.count) for e in summarize(ckpt).entries]
    assert names == [("ActivationStats:encoder.fc.moments", 7)]


def test_plot_every_stat_kind(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"state_dict": _model().state_dict()}, path)
    out = plot_summary(summarize_file(path), tmp_path / "m.png")
    assert out.stat().st_size > 1000
    empty = tmp_path / "empty.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, empty)
    with pytest.raises(ConfigError, match="no stat"):
        plot_summary(summarize_file(empty), tmp_path / "e.png")


def test_quantile_sketch_is_recognised_with_its_own_configuration(tmp_path: Path) -> None:
    """A sketch of any bucket count and accuracy reads back as one (not as a min/max), with
    q01/q50/q99 within its accuracy of numpy's; it plots as a range."""
    import numpy as np

    from statplug import QuantileNorm, RunningQuantiles

    model = nn.Module()
    model.q = RunningQuantiles(3, relative_accuracy=0.02, max_buckets=1024)
    model.qn = QuantileNorm(2)
    x = torch.randn(400, 3, dtype=torch.float64) * 2 + 10
    model.q.update(x)
    model.qn(x[:, :2])
    path = tmp_path / "q.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    by_name = {e.name: e for e in summarize_file(path).entries}
    entry = by_name["q"]
    assert (entry.kind, entry.count, entry.shape) == ("RunningQuantiles", 400, [3])
    assert by_name["qn.sketch"].kind == "RunningQuantiles"
    ref = np.quantile(x.numpy(), [0.01, 0.5, 0.99], axis=0, method="inverted_cdf")
    for i, key in enumerate(("q01", "q50", "q99")):
        assert np.allclose(entry.arrays[key], ref[i], rtol=0.02 * (1 + 1e-6), atol=0)
    assert entry.summary["q01"] == pytest.approx(ref[0].min(), rel=0.02)
    assert entry.summary["q99"] == pytest.approx(ref[2].max(), rel=0.02)
    assert entry.arrays["min"] == x.min(0).values.tolist()
    assert "RunningQuantiles" in format_table(summarize_file(path))
    assert plot_summary(summarize_file(path), tmp_path / "q.png").stat().st_size > 1000
