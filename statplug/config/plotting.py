"""``statplug plot``: per-feature mean ± std and min/max of a checkpoint's stats (Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

from statplug.config.checkpoint import CheckpointSummary, Entry
from statplug.config.errors import ConfigError

__all__ = ["plot_summary"]

_MAX_PANELS = 12
_MAX_FEATURES = 512


def _finite(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values[:_MAX_FEATURES]]


def plot_summary(summary: CheckpointSummary, out: str | Path, *, dpi: int = 100) -> Path:
    """Draw one panel per stat (up to 12) and save a PNG to ``out``; return its path.

    Moments are drawn as the per-feature mean with a ±1 std band, min/max stats as a range bar
    per feature. Features beyond the first 512 of a stat are left out.

    Raises:
        ConfigError: the checkpoint holds no stat with a count, or ``out`` cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats: list[Entry] = [e for e in summary.entries if e.group == "stat" and e.count]
    if not stats:
        raise ConfigError(f"`{summary.path}` holds no stat with samples to plot")
    shown = stats[:_MAX_PANELS]
    cols = 1 if len(shown) == 1 else 2
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 2.8 * rows), squeeze=False)
    for ax, e in zip(axes.flat, shown, strict=False):
        if "mean" in e.arrays:
            mean = _finite(e.arrays["mean"])
            std = _finite(e.arrays["std"])
            x = list(range(len(mean)))
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(x, lo, hi, alpha=0.3, label="mean ± std", step="mid")
            ax.plot(x, mean, marker=".", linewidth=1, label="mean")
        else:
            lo = _finite(e.arrays["min"])
            hi = _finite(e.arrays["max"])
            x = list(range(len(lo)))
            ax.vlines(x, lo, hi, linewidth=2, alpha=0.7, label="min .. max")
            ax.plot(x, lo, "v", markersize=3)
            ax.plot(x, hi, "^", markersize=3)
        span = [v for v in (lo + hi) if math.isfinite(v)]
        if span and min(span) > 0 and max(span) / min(span) > 1e3:
            ax.set_yscale("log")
        ax.set_title(f"{e.name} ({e.kind}, n={e.count:,})", fontsize=9)
        ax.set_xlabel("feature", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    more = f" (first {_MAX_PANELS} of {len(stats)} stats)" if len(stats) > len(shown) else ""
    fig.suptitle(f"{Path(summary.path).name}{more}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, format="png")
    except OSError as err:
        raise ConfigError(f"cannot write `{out}`: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return out
