"""``statplug plot``: the stats of one checkpoint per feature, or of several across training.

Figures are drawn on matplotlib's Agg canvas (no display, no global backend switch). Readability
rules every figure follows, checked by the tests on the rendered figure:

* no two tick labels of an axis overlap (on a symlog axis ``10⁻²``, ``0`` and ``-10⁻²`` crowd
  around zero): after layout, overlapping labels are thinned, keeping ``0`` and the extremes;
* one legend for the whole figure, above the panels, so it never covers data;
* a std band is clipped to the range the data was observed in, when the checkpoint has it: the
  layer's min/max (``ActivationStats``), or a ``RunningMinMax`` of the same shape that has seen
  exactly as many samples in the same place (``TabularMLP``'s ``feature_range`` beside its
  ``norm``), so a non-negative feature's band does not dip below zero.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statplug._extras import require
from statplug.errors import ConfigError
from statplug.inspect.checkpoint import (
    CHECKPOINT_SUFFIXES,
    CheckpointSummary,
    Entry,
    json_safe,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "checkpoint_files",
    "different_runs",
    "over_time_figure",
    "plot_over_time",
    "plot_summary",
    "save_figure",
    "summary_figure",
]

_MAX_PANELS = 12
_MAX_FEATURES = 512
_PANEL_SIZE = (6.5, 2.8)  # inches per panel
_HEADER = 0.6  # inches above the panels: title and legend
_LABEL_PAD = 1.0  # pixels between two tick labels
_BAND, _MEAN, _RANGE = "C0", "C0", "0.45"


# ----------------------------------------------------------------------------- inputs
def checkpoint_files(paths: Sequence[str | Path]) -> list[Path]:
    """The checkpoint files named by ``paths``: files as given, folders searched recursively.

    Raises:
        ConfigError: a folder holds no checkpoint file.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.suffix in CHECKPOINT_SUFFIXES and f.is_file()
            )
            if not found:
                raise ConfigError(
                    f"folder `{p}` holds no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)} files)"
                )
            files += found
        else:
            files.append(p)
    return files


def _finite(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values[:_MAX_FEATURES]]


def _key(e: Entry) -> tuple[str, str]:
    return e.source, e.name


def _panels(stats: list[Entry]) -> list[tuple[str, list[Entry]]]:
    """Stats grouped per panel: a layer's ``moments`` and ``minmax`` share one, and so do a
    moments stat and the one min/max stat of the same source, shape and count (the same data)."""
    groups: dict[tuple[str, str], list[Entry]] = {}
    titles: dict[tuple[str, str], str] = {}
    for e in stats:
        parent, _, leaf = e.name.rpartition(".")
        name = parent if parent and leaf in ("moments", "minmax") else e.name
        groups.setdefault((e.source, name), []).append(e)
        titles[(e.source, name)] = name

    def has(group: list[Entry], part: str) -> bool:
        return any(part in e.arrays for e in group)

    def same_data(a: Entry, b: Entry) -> bool:
        return a.source == b.source and a.shape == b.shape and a.count == b.count

    lone_ranges = [k for k, g in groups.items() if not has(g, "mean") and has(g, "min")]
    for key, group in list(groups.items()):
        if not has(group, "mean") or has(group, "min"):
            continue
        matches = [k for k in lone_ranges if k in groups and same_data(groups[k][0], group[0])]
        if len(matches) == 1:
            group += groups.pop(matches[0])
            titles[key] = f"{titles[key]} + {titles.pop(matches[0])}"
            lone_ranges.remove(matches[0])
    return [(titles[k], g) for k, g in groups.items()]


# ----------------------------------------------------------------------------- layout
def _figure(n_panels: int) -> tuple[Figure, list[Axes]]:
    Figure = require("matplotlib.figure", "`statplug plot`").Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    cols = 1 if n_panels == 1 else 2
    rows = math.ceil(n_panels / cols)
    width, height = _PANEL_SIZE[0] * cols, _PANEL_SIZE[1] * rows + _HEADER
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n_panels:]:
        ax.axis("off")
    return fig, axes[:n_panels]


def _legend_and_layout(fig: Figure, title: str, handles: list[Any]) -> None:
    height = fig.get_figheight()
    top = 1.0 - _HEADER / height
    fig.suptitle(title, fontsize=10, y=1.0 - 0.08 / height, va="top")
    if handles:
        fig.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, 1.0 - 0.3 / height),
            ncol=len(handles),
            fontsize=8,
            frameon=False,
        )
    fig.tight_layout(rect=(0.0, 0.0, 1.0, top), pad=0.4, h_pad=1.0)


def _set_scale(ax: Axes, values: list[float], *, spread_from: str = "median") -> None:
    """Symlog when the values span orders of magnitude: the largest over the median one
    (per-feature values: a few huge features) or over the smallest (a few summary lines)."""
    mags = sorted(abs(v) for v in values if math.isfinite(v) and v != 0)
    ref = mags[len(mags) // 2 if spread_from == "median" else 0] if mags else 0.0
    if mags and mags[-1] / ref > 100:
        # Raw features span orders of magnitude (areas next to ratios): a linear axis would
        # flatten all but the largest.
        ax.set_yscale("symlog", linthresh=max(mags[len(mags) // 4], 1e-6))


def _overlaps(a: Any, b: Any) -> bool:
    pad = _LABEL_PAD
    return a.x0 < b.x1 + pad and b.x0 < a.x1 + pad and a.y0 < b.y1 + pad and b.y0 < a.y1 + pad


def _thin_tick_labels(fig: Figure, axes: list[Axes]) -> None:
    """Keep, per axis, the tick labels that do not overlap: ``0`` first, then the outermost."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            ticks = [
                (float(t.get_loc()), t.label1.get_window_extent(renderer))
                for t in axis.get_major_ticks()
                if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi
            ]
            order = sorted(ticks, key=lambda t: (t[0] != 0, -abs(t[0])))
            kept: list[tuple[float, Any]] = []
            for loc, box in order:
                if not any(_overlaps(box, other) for _, other in kept):
                    kept.append((loc, box))
            if len(kept) < len(ticks):
                axis.set_ticks(sorted(loc for loc, _ in kept))


def save_figure(fig: Figure, out: str | Path, *, dpi: int = 100) -> Path:
    """Thin overlapping tick labels, then write ``fig`` as a PNG to ``out``.

    Raises:
        ConfigError: ``out`` cannot be written.
    """
    axes = [ax for ax in fig.axes if ax.axison]
    _thin_tick_labels(fig, axes)
    _thin_tick_labels(fig, axes)  # new fixed ticks can format differently: check once more
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, format="png")
    except OSError as err:
        raise ConfigError(f"cannot write `{out}`: {err.strerror or err}") from None
    return out


def _handles(moments: bool, ranges: bool) -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    if moments:
        handles.append(Line2D([], [], color=_MEAN, marker=".", linewidth=1, label="mean"))
        handles.append(Patch(color=_BAND, alpha=0.3, label="± std (within the observed range)"))
    if ranges:
        handles.append(Line2D([], [], color=_RANGE, linewidth=1, label="min .. max"))
    return handles


# ----------------------------------------------------------------------------- one checkpoint
@dataclass
class _Range:
    lo: list[float]
    hi: list[float]


def _range_of(group: list[Entry]) -> _Range | None:
    for e in group:
        if "min" in e.arrays:
            return _Range(_finite(e.arrays["min"]), _finite(e.arrays["max"]))
    return None


def _draw_features(ax: Axes, group: list[Entry]) -> list[float]:
    values: list[float] = []
    rng = _range_of(group)
    for e in group:
        if "mean" not in e.arrays:
            continue
        mean, std = _finite(e.arrays["mean"]), _finite(e.arrays["std"])
        x = list(range(len(mean)))
        lo = [m - s for m, s in zip(mean, std, strict=True)]
        hi = [m + s for m, s in zip(mean, std, strict=True)]
        if rng is not None and len(rng.lo) == len(lo):
            lo = [max(a, b) for a, b in zip(lo, rng.lo, strict=True)]
            hi = [min(a, b) for a, b in zip(hi, rng.hi, strict=True)]
        ax.fill_between(x, lo, hi, alpha=0.3, color=_BAND, step="mid", linewidth=0)
        ax.plot(x, mean, marker=".", linewidth=1, color=_MEAN)
        values += lo + hi + mean
    if rng is not None:
        x = list(range(len(rng.lo)))
        ax.vlines(x, rng.lo, rng.hi, colors=_RANGE, linewidth=1, alpha=0.7)
        ax.plot(x, rng.lo, "v", color=_RANGE, markersize=3)
        ax.plot(x, rng.hi, "^", color=_RANGE, markersize=3)
        values += rng.lo + rng.hi
    return values


def summary_figure(summary: CheckpointSummary) -> Figure:
    """One panel per stat (up to 12): per-feature mean with a ±1 std band, min/max bars.

    Raises:
        ConfigError: the checkpoint holds no stat with a count.
    """
    stats = [e for e in summary.entries if e.group == "stat" and e.count]
    if not stats:
        raise ConfigError(f"`{summary.path}` holds no stat with samples to plot")
    panels = _panels(stats)
    shown = panels[:_MAX_PANELS]
    fig, axes = _figure(len(shown))
    from matplotlib.ticker import MaxNLocator

    for ax, (title, group) in zip(axes, shown, strict=True):
        _set_scale(ax, _draw_features(ax, group))
        kinds = " + ".join(e.kind for e in group)
        ax.set_title(f"{title} ({kinds}, n={group[0].count:,})", fontsize=9)
        ax.set_xlabel("feature", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    more = f" (first {_MAX_PANELS} of {len(panels)} panels)" if len(panels) > len(shown) else ""
    groups = [g for _, g in shown]
    handles = _handles(
        any("mean" in e.arrays for g in groups for e in g),
        any(_range_of(g) is not None for g in groups),
    )
    _legend_and_layout(fig, f"{Path(summary.path).name}{more}", handles)
    return fig


def plot_summary(summary: CheckpointSummary, out: str | Path, *, dpi: int = 100) -> Path:
    """Draw :func:`summary_figure` and save it as a PNG to ``out``; return its path.

    Moments are drawn as the per-feature mean with a ±1 std band (clipped to the observed
    range when known), min/max stats as a grey range bar per feature; a layer's moments and
    min/max (``ActivationStats``) share a panel. Features beyond the first 512 are left out.

    Raises:
        ConfigError: the checkpoint holds no stat with a count, or ``out`` cannot be written.
    """
    return save_figure(summary_figure(summary), out, dpi=dpi)


# ----------------------------------------------------------------------------- over time
def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _order(summaries: list[CheckpointSummary]) -> list[CheckpointSummary]:
    return sorted(
        summaries,
        key=lambda s: (
            s.global_step is None,
            s.global_step or 0,
            s.epoch or 0,
            s.path,
        ),
    )


# Config sections that say which experiment a checkpoint belongs to (the trainer's may change on
# a resume: more epochs, another device count).
_EXPERIMENT_KEYS = ("model", "data", "seed")


def different_runs(summaries: list[CheckpointSummary]) -> str | None:
    """Why ``summaries`` cannot be one run's checkpoints, or None when nothing says so.

    Within one run, taken in global-step order, no stat's count goes down, and the stored
    recipe configs agree on the model, the data and the seed.
    """
    runs = _order(summaries)
    for a, b in itertools.pairwise(runs):
        counts = {_key(e): e.count for e in a.entries if e.group == "stat" and e.count is not None}
        for e in b.entries:
            before = counts.get(_key(e))
            if e.group == "stat" and e.count is not None and before is not None and (
                e.count < before or (e.count != before and a.global_step == b.global_step)
            ):
                return (
                    f"the count of `{e.name}` goes from {before:,} in {Path(a.path).name} (step "
                    f"{a.global_step}) to {e.count:,} in {Path(b.path).name} (step "
                    f"{b.global_step})"
                )
    configs = [(s, s.config) for s in runs if isinstance(s.config, dict)]
    for (a, ca), (b, cb) in itertools.pairwise(configs):
        for key in _EXPERIMENT_KEYS:
            # json_safe: a crafted file's config may hold tensors, which do not compare as bools.
            if json_safe(ca.get(key)) != json_safe(cb.get(key)):
                return (f"the stored configs of {Path(a.path).name} and {Path(b.path).name} "
                        f"differ in `{key}`")
    return None


def _warn_if_different_runs(summaries: list[CheckpointSummary]) -> None:
    reason = different_runs(summaries)
    if reason is not None:
        warnings.warn(
            f"these checkpoints look like different runs on one time axis: {reason}; plot each "
            "run's checkpoints on their own (or pass one run's folder)",
            UserWarning, stacklevel=3,
        )


def _series(
    group_keys: list[tuple[str, str]], runs: list[CheckpointSummary]
) -> dict[str, list[float]]:
    """Per checkpoint: the mean over features of the mean and std, min of min, max of max."""
    out: dict[str, list[float]] = {"mean": [], "std": [], "min": [], "max": []}
    for s in runs:
        by_key = {_key(e): e for e in s.entries if e.group == "stat"}
        found = [by_key[k] for k in group_keys if k in by_key and by_key[k].count]
        moments = next((e for e in found if "mean" in e.arrays), None)
        rng = next((e for e in found if "min" in e.arrays), None)
        out["mean"].append(_mean(moments.arrays["mean"]) if moments else math.nan)
        out["std"].append(_mean(moments.arrays["std"]) if moments else math.nan)
        lo = [v for v in rng.arrays["min"] if math.isfinite(v)] if rng else []
        hi = [v for v in rng.arrays["max"] if math.isfinite(v)] if rng else []
        out["min"].append(min(lo) if lo else math.nan)
        out["max"].append(max(hi) if hi else math.nan)
    return out


def over_time_figure(summaries: list[CheckpointSummary]) -> Figure:
    """One panel per stat (up to 12): how its summary moved across the checkpoints.

    Checkpoints are ordered by global step; a ``UserWarning`` says when they look like
    different runs (:func:`different_runs`). Each panel shows the mean over features of the
    mean, a band of ± the mean over features of the std (clipped to the observed range when
    the checkpoint has it), and the minimum and maximum over features.

    Raises:
        ConfigError: fewer than two checkpoints, or none holds a stat with a count.
    """
    if len(summaries) < 2:
        raise ConfigError("a plot over time needs at least two checkpoints")
    _warn_if_different_runs(summaries)
    runs = _order(summaries)
    latest: dict[tuple[str, str], Entry] = {}
    for s in runs:
        for e in s.entries:
            if e.group == "stat" and e.count:
                latest[_key(e)] = e
    if not latest:
        raise ConfigError(f"none of the {len(runs)} checkpoints holds a stat with samples to plot")
    panels = _panels(list(latest.values()))
    shown = panels[:_MAX_PANELS]
    fig, axes = _figure(len(shown))
    steps = [s.global_step for s in runs]
    by_step = all(step is not None for step in steps) and len(set(steps)) == len(steps)
    x = [float(s.global_step or 0) if by_step else float(i) for i, s in enumerate(runs)]
    any_moments = any_range = False
    for ax, (title, group) in zip(axes, shown, strict=True):
        series = _series([_key(e) for e in group], runs)
        values: list[float] = []
        if any(math.isfinite(v) for v in series["mean"]):
            any_moments = True
            lo = [m - s for m, s in zip(series["mean"], series["std"], strict=True)]
            hi = [m + s for m, s in zip(series["mean"], series["std"], strict=True)]
            lo = [max(a, b) if math.isfinite(b) else a
                  for a, b in zip(lo, series["min"], strict=True)]
            hi = [min(a, b) if math.isfinite(b) else a
                  for a, b in zip(hi, series["max"], strict=True)]
            ax.fill_between(x, lo, hi, alpha=0.3, color=_BAND, linewidth=0)
            ax.plot(x, series["mean"], marker=".", linewidth=1, color=_MEAN)
            values += lo + hi
        if any(math.isfinite(v) for v in series["min"]):
            any_range = True
            ax.plot(x, series["min"], color=_RANGE, linewidth=1, marker="v", markersize=3)
            ax.plot(x, series["max"], color=_RANGE, linewidth=1, marker="^", markersize=3)
            values += series["min"] + series["max"]
        _set_scale(ax, values, spread_from="min")
        kinds = " + ".join(e.kind for e in group)
        ax.set_title(f"{title} ({kinds}, n={group[0].count:,} at the end)", fontsize=9)
        ax.set_xlabel("global step" if by_step else "checkpoint (in the order given)", fontsize=8)
        ax.tick_params(labelsize=7)
    more = f"; first {_MAX_PANELS} of {len(panels)} panels" if len(panels) > len(shown) else ""
    title = f"{len(runs)} checkpoints, {Path(runs[0].path).name} .. {Path(runs[-1].path).name}"
    _legend_and_layout(fig, title + more, _handles(any_moments, any_range))
    return fig


def plot_over_time(
    summaries: list[CheckpointSummary], out: str | Path, *, dpi: int = 100
) -> Path:
    """Draw :func:`over_time_figure` and save it as a PNG to ``out``; return its path."""
    return save_figure(over_time_figure(summaries), out, dpi=dpi)
