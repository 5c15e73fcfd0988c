"""``benchmarks/update.py`` runs and reports every shape, data kind and candidate.

No timing assertions: figures depend on the machine and its load, so they belong in the
benchmark's own output (and the README), not in a pass/fail test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "update.py"

SHAPES = [[256, 64], [4096, 512], [65536, 64]]
DATA = ["mean0", "mean1e4"]
CANDIDATES = [
    "batch_norm_update_stats",
    "RunningMoments.update",
    "RunningMoments.update[propagate]",
    "torch.var_mean",
    "MeanMetric.update",
]
VARIANCE_CANDIDATES = {
    "batch_norm_update_stats",
    "RunningMoments.update",
    "RunningMoments.update[propagate]",
    "torch.var_mean",
}


@pytest.mark.slow
def test_update_benchmark_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "update.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        # One thread: the suite may run next to other processes on a 2-core machine.
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "torch threads 1" in proc.stdout
    for label in ("(floor)", "RunningMoments (raise)", "RunningMoments (propagate)"):
        assert label in proc.stdout

    payload = json.loads(out.read_text())
    assert payload["shapes"] == SHAPES
    assert payload["data"] == DATA
    assert payload["candidates"] == CANDIDATES
    assert payload["meta"]["threads"] == 1 and payload["meta"]["quick"] is True

    results = payload["results"]
    seen = {(tuple(r["shape"]), r["data"], r["candidate"]) for r in results}
    expected = {(tuple(s), d, c) for s in SHAPES for d in DATA for c in CANDIDATES}
    assert seen == expected
    assert len(results) == len(expected)
    for r in results:
        assert r["us_median"] > 0 and r["us_min"] > 0 and r["rounds"] >= 1
        assert math.isfinite(r["ratio_vs_floor"]) and r["ratio_vs_floor"] > 0
        if r["candidate"] == "batch_norm_update_stats":
            assert r["ratio_vs_floor"] == 1.0
        has_err = r["data"] == "mean1e4" and r["candidate"] in VARIANCE_CANDIDATES
        assert (r["rel_var_err"] is not None) == has_err, r
        if has_err:
            assert math.isfinite(r["rel_var_err"]) and r["rel_var_err"] >= 0


def test_update_benchmark_plot(tmp_path: Path) -> None:
    """The plot is built from results alone (fake figures: no timing run needed)."""
    pytest.importorskip("matplotlib")
    name = "_statplug_benchmarks_update"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[name] = bench  # dataclasses look their module up while building the class
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[name]
    results = [
        bench.Result(
            shape=list(s),
            data=d,
            candidate=c,
            reps=1,
            rounds=1,
            us_median=10.0 * (i + 1),
            us_min=9.0 * (i + 1),
            ratio_vs_floor=float(i + 1),
            ratio_vs_floor_median=float(i + 1),
        )
        for s in bench.SHAPES
        for d in bench.DATA_KINDS
        for i, c in enumerate(bench.CANDIDATES)
    ]
    png = tmp_path / "update.png"
    bench.plot(results, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = bench.format_table(results, "header")
    assert table.count("(floor)") == len(bench.SHAPES) * len(bench.DATA_KINDS)


@pytest.mark.slow
def test_fit_overhead_recipe_with_sampling_runs() -> None:
    """``--recipe digits --every-n-steps 10`` runs and reports its ratio (no timing assertion)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fit_overhead.py"), "--recipe", "digits",
         "--every-n-steps", "10", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ActivationStats records every 10 step(s)" in proc.stdout
    assert "overhead ratio (median of pair ratios):" in proc.stdout
