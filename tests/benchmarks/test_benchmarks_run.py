"""Each benchmark runs in quick mode, exits 0 and prints its ``ratio`` lines.

No timing assertions: figures depend on the machine and its load, so they belong in the
benchmark's own output (and the README), not in a pass/fail test. A target line only has to
carry a verdict, PASS or FAIL.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
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
    "RunningMoments.update[skip]",
    "RunningMoments.update[propagate]",
    "torch.var_mean",
    "MeanMetric.update",
]
VARIANCE_CANDIDATES = {
    "batch_norm_update_stats",
    "RunningMoments.update",
    "RunningMoments.update[skip]",
    "RunningMoments.update[propagate]",
    "torch.var_mean",
}
# `ratio LABEL: 1.23x  target <= 1.5x  PASS`, `... (info)`, `...: n/a (...)`, `...: not measured`
RATIO = re.compile(r"^ratio (?P<label>.+?): (?P<value>\d+\.\d+x|n/a|not measured)(?P<rest>.*)$",
                   re.MULTILINE)


def run_quick(script: str, *args: str, timeout: float = 600) -> str:
    """Run ``benchmarks/SCRIPT --quick ARGS`` in a subprocess; its stdout (exit 0 asserted)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


def ratio_lines(stdout: str) -> dict[str, str]:
    """Every ``ratio`` line by label; a target line must end with a verdict."""
    lines = {}
    for m in RATIO.finditer(stdout):
        rest = m["rest"]
        if "target <=" in rest:
            assert rest.rstrip().endswith(("PASS", "FAIL")), m[0]
        elif m["value"].endswith("x"):
            assert rest.strip() == "(info)", m[0]
        lines[m["label"]] = m[0]
    return lines


def assert_labels(lines: dict[str, str], expected: list[str]) -> None:
    missing = [label for label in expected if label not in lines]
    assert not missing, (missing, sorted(lines))


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
    for label in ("(floor)", "RunningMoments (raise)", "RunningMoments (skip)",
                  "RunningMoments (propagate)"):
        assert label in proc.stdout
    lines = ratio_lines(proc.stdout)
    assert_labels(lines, [
        f"RunningMoments ({policy}) / floor {'x'.join(map(str, s))} {kind} (median)"
        for s in SHAPES for kind in ("mean 0", "mean 1e4") for policy in ("raise", "skip",
                                                                           "propagate")
    ] + ["masked / unmasked RunningMoments.update 4096x512 (median)"])
    for label, line in lines.items():
        if label.startswith("RunningMoments"):
            assert "target <=" in line, line

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


@pytest.mark.slow
def test_rl_step_quick_run() -> None:
    """One observation and a batch of 64, each at 4 and 64 features, with the reference floor."""
    pytest.importorskip("gymnasium")
    out = run_quick("rl_step.py")
    assert "torch threads" in out and "(torch's default)" in out
    assert out.count("  ok") == 2 and "MISMATCH" not in out  # both normalisers do the same work
    lines = ratio_lines(out)
    expected = []
    for case, baseline in (("1x4", "NormalizeObservation"), ("1x64", "NormalizeObservation"),
                           ("64x4", "vector NormalizeObservation"),
                           ("64x64", "vector NormalizeObservation")):
        expected += [f"RunningNorm {case} / {baseline}",
                     f"eight plain torch ops, float64 state, {case} / {baseline}",
                     f"eight ops + normalise {case} / {baseline}"]
        assert "target <= 1.5x" in lines[f"RunningNorm {case} / {baseline}"]
    expected.append("whole CartPole step, env + RunningNorm / NormalizeObservation(env)")
    assert_labels(lines, expected)


@pytest.mark.slow
def test_norm_vs_peers_quick_run() -> None:
    """rsl_rl and BatchNorm1d rows, the variance errors, and the compiled step's line."""
    pytest.importorskip("rsl_rl")
    out = run_quick("norm_vs_peers.py")
    assert "torch threads 1" in out
    lines = ratio_lines(out)
    expected = []
    for shape in ("256x64", "4096x512"):
        expected += [f"RunningNorm / rsl_rl EmpiricalNormalization {shape} mean {m}"
                     for m in ("0", "10000")]
        expected += [f"RunningNorm / BatchNorm1d {shape} {mode}" for mode in ("train", "eval")]
    expected.append("compiled MLP step RunningNorm / BatchNorm1d (inductor, dynamic batch)")
    assert_labels(lines, expected)
    for label in expected:
        assert "target <=" in lines[label], lines[label]  # measured or reported as failed
    assert out.count("variance error,") == 3 and "rsl_rl EmpiricalNormalization" in out


@pytest.mark.slow
def test_sync_quick_run(tmp_path: Path) -> None:
    """Every section of sync.py in quick mode: K stats vs DDP, the big stat, the metrics."""
    out = run_quick("sync.py", "--features", "1000000", "--json", str(tmp_path / "sync.json"))
    lines = ratio_lines(out)
    expected = [f"sync_stats {what} / DDP buffer broadcast, K={k}"
                for k in (1, 16, 64, 256) for what in ("after update", "nothing new")]
    expected += ["big stat: sync after new data / flat all_reduce of the payload",
                 "big stat: sync peak extra memory / payload (first and later syncs)"]
    expected += [f"sync_metrics block / torchmetrics' own sync, K={k}" for k in (1, 16, 64, 256)]
    assert_labels(lines, expected)
    assert "target <= 2.5x" in lines["sync_stats after update / DDP buffer broadcast, K=256"]
    results = json.loads((tmp_path / "sync.json").read_text())
    assert set(results) == {"stats", "big", "metrics"}
    assert results["stats"]["256"]["ddp_buckets"] >= 1



@pytest.mark.slow
def test_quantiles_quick_run() -> None:
    """Accuracy lines for every distribution and one speed line per nan policy against KLL."""
    out = run_quick("quantiles.py")
    assert "torch threads 1" in out
    lines = ratio_lines(out)
    expected = [
        f"max relative error at q=0.01/0.5/0.99 / relative_accuracy, {kind}"
        for kind in ("normal", "lognormal", "cauchy", "mixed", "span 1e-6..1e6")
    ]
    expected += [f"RunningQuantiles.update ({policy}) / KLL k=200 update, 4096x64 float32"
                 for policy in ("raise", "skip", "propagate")]
    assert_labels(lines, expected)
    for label in expected:
        assert "target <=" in lines[label], lines[label]  # measured or reported as failed
    assert re.search(r"^sketches' extra collectives: \+\d+  target <= \+2  (PASS|FAIL)$", out,
                     re.MULTILINE), out[-2000:]
