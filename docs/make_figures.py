"""Make the README's StatsMonitor figures from a real run of the `digits` recipe.

Run from the repository root (about a minute on 2 CPU cores; needs the `recipes` extra)::

    .venv/bin/python docs/make_figures.py            # writes docs/stats_monitor.png and
                                                     # docs/plot_over_time.png

The recipe runs with its default callback stack (SyncStats, AuditBuffers, StatsMonitor,
ActivationStats on the conv and fc layers), the monitor and ActivationStats logging every 5 steps,
and a checkpoint kept at every epoch end. ``stats_monitor.png`` draws the logged columns of the
CSV logger's ``metrics.csv``; ``plot_over_time.png`` is ``statplug plot`` over the checkpoints.
"""

from __future__ import annotations

import csv
import math
import sys
import tempfile
import warnings
from pathlib import Path

from statplug import run_recipe
from statplug.inspect.checkpoint import summarize_file
from statplug.inspect.plotting import checkpoint_files, plot_over_time, save_figure

DOCS = Path(__file__).resolve().parent
EVERY = 5
LAYERS = ("features.conv1", "features.conv2", "classifier.fc1", "classifier.fc2")


def _column(rows: list[dict[str, str]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        if row.get(key):
            xs.append(float(row["step"]))
            ys.append(float(row[key]))
    return xs, ys


def monitor_figure(metrics_csv: Path, out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(13.0, 6.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0, 0], "count", "samples seen (stats/<name>/count)", ["stats/norm"]),
        (axes[0, 1], "drift", "drift of the mean since the last log (in stds)",
         ["stats/norm", *(f"activations/{n}" for n in LAYERS)]),
        (axes[1, 0], "mean", "mean over features (activations/<layer>/mean)",
         [f"activations/{n}" for n in LAYERS]),
        (axes[1, 1], "std", "std averaged over features (activations/<layer>/std)",
         [f"activations/{n}" for n in LAYERS]),
    ]
    everything = ["stats/norm", *(f"activations/{n}" for n in LAYERS)]
    colors = {prefix: f"C{i}" for i, prefix in enumerate(everything)}  # one colour per stat
    for ax, leaf, title, prefixes in panels:
        for prefix in prefixes:
            xs, ys = _column(rows, f"{prefix}/{leaf}")
            if leaf == "drift":
                kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]  # log axis
                xs, ys = [x for x, _ in kept], [y for _, y in kept]
            ax.plot(xs, ys, marker=".", linewidth=1, color=colors[prefix],
                    label=prefix.split("/", 1)[1])
        if leaf == "drift":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("global step", fontsize=8)
        ax.tick_params(labelsize=8)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.955))
    fig.suptitle("StatsMonitor + ActivationStats on the digits recipe (CSVLogger's metrics.csv)",
                 fontsize=11, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return save_figure(fig, out)


def main() -> int:
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_recipe(
            "digits",
            [
                "trainer.max_epochs=6",
                f"trainer.default_root_dir={tmp}",
                "callbacks.monitor.logging_interval=step",
                f"callbacks.monitor.every_n_steps={EVERY}",
                f"callbacks.activations.log_every_n_steps={EVERY}",
                "+callbacks.checkpoints={_target_: lightning.pytorch.callbacks.ModelCheckpoint, "
                "save_top_k: -1}",
            ],
            progress=False,
        )
        log_dir = Path(result.trainer.logger.log_dir)
        written = monitor_figure(log_dir / "metrics.csv", DOCS / "stats_monitor.png")
        files = checkpoint_files([log_dir / "checkpoints"])
        summaries = [summarize_file(f) for f in files]
        over_time = plot_over_time(summaries, DOCS / "plot_over_time.png")
    acc = float(result.trainer.callback_metrics["val_acc"])
    print(f"val_acc {acc:.3f}" if math.isfinite(acc) else "val_acc n/a")
    print(written)
    print(over_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
