"""``statplug plot``: figures rendered with Agg and checked with matplotlib's own text extents."""

from __future__ import annotations

import itertools
import struct
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from statplug import ActivationStats, RunningMinMax, RunningNorm, StatsMixin
from statplug.inspect.checkpoint import summarize, summarize_file
from statplug.inspect.plotting import over_time_figure, save_figure, summary_figure

pytest.importorskip("matplotlib")


def _raw_features(n: int = 400) -> Tensor:
    """Non-negative features over six orders of magnitude (areas next to ratios), some zeros."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-3, 2e-2, 0.1, 1.0, 10.0, 300.0, 2e3, 5e-3])
    x = torch.rand(n, scales.numel(), generator=g).pow(3) * scales
    x[:, 0] = torch.where(torch.rand(n, generator=g) < 0.7, 0.0, x[:, 0])
    return x


def _tick_label_boxes(fig: Any) -> list[list[Any]]:
    """Per visible axis, the window extents of its drawn major tick labels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        if not ax.axison:
            continue
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            out.append([
                t.label1.get_window_extent(renderer)
                for t in axis.get_major_ticks()
                if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi
            ])
    return out


def _assert_readable(fig: Any) -> None:
    for boxes in _tick_label_boxes(fig):
        assert len(boxes) >= 2  # thinning keeps the axis readable, not empty
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (a, b)
    renderer = fig.canvas.get_renderer()
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.axison:
                assert not box.overlaps(ax.get_window_extent(renderer))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    return width, height


def test_single_checkpoint_plot_is_readable_and_bands_stay_in_the_observed_range(
    tmp_path: Path,
) -> None:
    model = nn.Module()
    model.norm = RunningNorm(8)
    model.feature_range = RunningMinMax(8)  # the same rows: paired with the norm's moments
    model.other = RunningMinMax(3)
    x = _raw_features()
    model.norm(x)
    model.feature_range.update(x)
    model.other.update(torch.randn(10, 3))
    summary = summarize({"state_dict": model.state_dict()}, "raw.ckpt")
    fig = summary_figure(summary)
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title().split(" (")[0] for ax in panels] == [
        "norm + feature_range", "other"
    ]
    assert panels[0].get_yscale() == "symlog"
    # The ±std band never leaves [min, max] of each feature (it would dip below 0 unclipped).
    band = panels[0].collections[0].get_paths()[0].vertices
    assert band[:, 1].min() >= 0.0
    mean, std = model.norm.mean.double(), model.norm.std.double()
    assert bool(((mean - std) < 0).any())  # the unclipped band would have gone negative
    out = save_figure(fig, tmp_path / "one.png")
    _assert_readable(fig)
    assert _png_size(out) == (1300, 340)  # 2 panels in 2 columns, 100 dpi


def test_unclipped_symlog_ticks_would_overlap_without_thinning() -> None:
    """The check above can fail: matplotlib's own symlog ticks overlap on this data."""
    import matplotlib.figure

    x = _raw_features().double()
    fig = matplotlib.figure.Figure(figsize=(6.5, 2.8))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    ax = fig.subplots()
    mean, std = x.mean(0), x.std(0)
    ax.fill_between(range(8), mean - std, mean + std)
    ax.set_yscale("symlog", linthresh=float(mean.abs().sort().values[2]))
    fig.tight_layout()
    overlapping = [
        boxes for boxes in _tick_label_boxes(fig)
        if any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    ]
    assert overlapping


class _Net(StatsMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.norm = RunningNorm(4)
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.fc(self.norm(x))))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _three_checkpoints(tmp_path: Path) -> list[Path]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g) * 2 + 1
    y = x.sum(1, keepdim=True)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ckpt, ActivationStats(["fc"])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Net(), dl)
    return sorted((tmp_path / "ckpts").glob("*.ckpt"))


def test_plot_over_three_checkpoints(tmp_path: Path) -> None:
    files = _three_checkpoints(tmp_path)
    assert len(files) == 3
    summaries = [summarize_file(f) for f in reversed(files)]  # order comes from global_step
    fig = over_time_figure(summaries)
    panels = [ax for ax in fig.axes if ax.axison]
    titles = [ax.get_title().split(" (")[0] for ax in panels]
    assert titles == ["norm", "ActivationStats:fc"]
    mean_line = panels[1].get_lines()[0]
    assert list(mean_line.get_xdata()) == [3.0, 6.0, 9.0]
    expected = []
    for f in files:  # independent reference: the saved mean and m2, read in float64
        layer = torch.load(f, weights_only=True)["callbacks"]
        layer = next(v for k, v in layer.items() if k.startswith("ActivationStats"))["layers"][0]
        expected.append(layer["moments"]["mean"].double().mean().item())
    assert list(mean_line.get_ydata()) == pytest.approx(expected, rel=1e-6)
    out = save_figure(fig, tmp_path / "time.png")
    _assert_readable(fig)
    assert _png_size(out) == (1300, 340)


@pytest.mark.slow
def test_statplug_plot_over_a_folder_and_files(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
    from cli_helpers import run_subprocess

    files = _three_checkpoints(tmp_path)
    res = run_subprocess(["plot", str(tmp_path / "ckpts"), "-o", "time.png"], tmp_path)
    assert res.code == 0, res.err
    assert _png_size(tmp_path / "time.png") == (1300, 340)
    res = run_subprocess(["plot", str(files[0]), "-o", "one.png"], tmp_path)
    assert res.code == 0, res.err
    assert _png_size(tmp_path / "one.png")[0] == 1300
    res = run_subprocess(["plot", str(tmp_path / "nothing"), "-o", "x.png"], tmp_path)
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res.err
