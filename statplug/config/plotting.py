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


def _panels(stats: list[Entry]) -> list[tuple[str, list[Entry]]]:
    """Stats grouped per panel: a layer's ``moments`` and ``minmax`` share one."""
    groups: dict[str, list[Entry]] = {}
    for e in stats:
        parent, _, leaf = e.name.rpartition(".")
        key = parent if parent and leaf in ("moments", "minmax") else e.name
        groups.setdefault(key, []).append(e)
    return list(groups.items())


def plot_summary(summary: CheckpointSummary, out: str | Path, *, dpi: int = 100) -> Path:
    """Draw one panel per stat (up to 12) and save a PNG to ``out``; return its path.

    Moments are drawn as the per-feature mean with a ±1 std band, min/max stats as a grey range
    bar per feature; a layer's moments and min/max (``ActivationStats``) share a panel. Features
    beyond the first 512 of a stat are left out.

    Raises:
        ConfigError: the checkpoint holds no stat with a count, or ``out`` cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats: list[Entry] = [e for e in summary.entries if e.group == "stat" and e.count]
    if not stats:
        raise ConfigError(f"`{summary.path}` holds no stat with samples to plot")
    panels = _panels(stats)
    shown = panels[:_MAX_PANELS]
    cols = 1 if len(shown) == 1 else 2
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 2.8 * rows), squeeze=False)
    for ax, (title, group) in zip(axes.flat, shown, strict=False):
        values: list[float] = []
        for e in group:
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
                ax.vlines(x, lo, hi, colors="gray", linewidth=1, alpha=0.6, label="min .. max")
                ax.plot(x, lo, "v", color="gray", markersize=3)
                ax.plot(x, hi, "^", color="gray", markersize=3)
            values += lo + hi
        mags = sorted(abs(v) for v in values if math.isfinite(v) and v != 0)
        if mags and mags[-1] / mags[len(mags) // 2] > 100:
            # Raw features span orders of magnitude (areas next to ratios): a linear axis would
            # flatten all but the largest.
            ax.set_yscale("symlog", linthresh=max(mags[len(mags) // 4], 1e-6))
        kinds = " + ".join(e.kind for e in group)
        ax.set_title(f"{title} ({kinds}, n={group[0].count:,})", fontsize=9)
        ax.set_xlabel("feature", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    more = f" (first {_MAX_PANELS} of {len(panels)} panels)" if len(panels) > len(shown) else ""
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
