"""Benchmark ``RunningQuantiles``: accuracy against numpy and update speed against DataSketches.

Run from the repository root::

    .venv/bin/python benchmarks/quantiles.py            # full run, about a minute on 2 cores
    .venv/bin/python benchmarks/quantiles.py --quick    # a few seconds, for smoke tests

**Accuracy.** For normal, log-normal, heavy-tailed (Cauchy), mixed-sign (with a point mass at
zero) data and data whose magnitudes span 1e-6 to 1e6 with both signs, float32, it feeds the same
batches of 4096 rows to a ``RunningQuantiles`` (default ``relative_accuracy=0.01``) and to one
DataSketches KLL sketch (k=200) per column, and prints the largest relative value error
``|estimate - exact| / |exact|`` at q = 0.01, 0.5 and 0.99 over the features, against
``numpy.quantile(method="inverted_cdf")`` of the same float32 data in float64 (the definition
both sketches estimate). Target, per distribution: the sketch's error at most
``relative_accuracy`` (printed as a ratio to it, <= 1x). KLL's errors are for information: its
guarantee is on ranks (about 1.65% of n at k=200, with high probability), not on values.

**Speed.** On one 4096x64 float32 batch and one torch thread, interleaved blocks
(``benchmarks/_timing.py``) time ``RunningQuantiles.update`` for each ``nan_policy`` against 64
KLL sketches (k=200) fed the same 64 columns as contiguous numpy arrays (made once, outside the
timing, so KLL pays no conversion). Target: at least 3x KLL's throughput, printed as the time
ratio, <= 0.333x. The throughput in values per second is printed for each.

**Sync** (2 gloo ranks, real processes, one torch thread each; the helpers of
``benchmarks/sync.py``): K ``RunningMoments(F)`` stats alone, then the same K with K
``RunningQuantiles(F)`` next to them (K=64, F=32; quick: K=8, F=16), ranks fed different data
before each timed sync. Printed: the median time, the collectives and the payload bytes of each.
Target: the sketches add at most 2 collectives. A sketch's payload is ``F * (2 * max_buckets +
1)`` float64 values (what each bucket gained since the last sync), 32 KiB per feature at the
default 2048 buckets, so K=64, F=256 (the issue's figure) would send 512 MiB per rank; the run
uses F=32 to stay within a shared machine's memory.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # run as a script from a checkout without an installed package
    import statplug  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this file
from _timing import failed_line, first_line, interleaved, ratio_line

from statplug import RunningMoments, RunningQuantiles, sync_stats

QS = (0.01, 0.5, 0.99)
DISTRIBUTIONS = ("normal", "lognormal", "cauchy", "mixed", "span 1e-6..1e6")
KLL_K = 200
SPEED_SHAPE = (4096, 64)
SPEED_TARGET = 1 / 3  # time ratio to KLL: at least 3x its throughput
POLICIES = ("raise", "skip", "propagate")


def make_data(kind: str, n: int, f: int, seed: int) -> np.ndarray:
    """``n`` float32 rows of ``f`` features of one of :data:`DISTRIBUTIONS` (the tests use
    these too)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.normal(5.0, 2.0, size=(n, f))
    elif kind == "lognormal":
        x = rng.lognormal(0.0, 3.0, size=(n, f))
    elif kind == "cauchy":
        x = rng.standard_cauchy(size=(n, f))
    elif kind == "mixed":
        x = rng.normal(-1.0, 3.0, size=(n, f))
        x[rng.random((n, f)) < 0.05] = 0.0
    elif kind == "span 1e-6..1e6":
        mag = np.exp(rng.uniform(math.log(1e-6), math.log(1e6), size=(n, f)))
        x = mag * rng.choice([-1.0, 1.0], size=(n, f))
    else:
        raise ValueError(f"make_data: `kind` must be one of {DISTRIBUTIONS}, got {kind!r}")
    return x.astype(np.float32)


def _kll_sketches(f: int) -> list[object] | None:
    try:
        from datasketches import kll_floats_sketch
    except ImportError:
        return None
    return [kll_floats_sketch(KLL_K) for _ in range(f)]


def _relative_error(est: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per quantile, the largest relative value error over the features (0 where both are 0)."""
    err = np.abs(est - exact)
    scale = np.abs(exact)
    rel = np.where(scale > 0, err / np.where(scale > 0, scale, 1.0), np.where(err > 0, np.inf, 0))
    return np.asarray(rel.max(axis=1))


def accuracy(n: int, f: int, seed: int) -> dict[str, dict[str, np.ndarray | None]]:
    """Per distribution: the relative errors at ``QS`` of the sketch and of KLL."""
    out: dict[str, dict[str, np.ndarray | None]] = {}
    qs = np.array(QS)
    for i, kind in enumerate(DISTRIBUTIONS):
        x = make_data(kind, n, f, seed + i)
        exact = np.quantile(x.astype(np.float64), qs, axis=0, method="inverted_cdf")
        sketch = RunningQuantiles(f)
        kll = _kll_sketches(f)
        for start in range(0, n, 4096):
            batch = x[start : start + 4096]
            sketch.update(torch.from_numpy(batch))
            if kll is not None:
                for j, k in enumerate(kll):
                    k.update(np.ascontiguousarray(batch[:, j]))  # type: ignore[attr-defined]
        est = sketch.quantile(torch.tensor(qs)).numpy()
        kll_err = None
        if kll is not None:
            kll_est = np.array([[k.get_quantile(q) for k in kll] for q in qs])  # type: ignore[attr-defined]
            kll_err = _relative_error(kll_est, exact)
        out[kind] = {"sketch": _relative_error(est, exact), "kll": kll_err}
    return out


def speed(rounds: int, target_s: float, seed: int) -> dict[str, float]:
    """Median seconds per update of one 4096x64 batch, per candidate."""
    n, f = SPEED_SHAPE
    x = torch.from_numpy(make_data("normal", n, f, seed))
    fns: dict[str, Callable[[], object]] = {}
    for policy in POLICIES:
        stat = RunningQuantiles(f, nan_policy=policy)  # type: ignore[arg-type]
        fns[f"RunningQuantiles.update ({policy})"] = _bind(stat, x)
    kll = _kll_sketches(f)
    if kll is not None:
        columns = [np.ascontiguousarray(x.numpy()[:, j]) for j in range(f)]

        def feed_kll() -> None:
            for sketch, column in zip(kll, columns, strict=True):
                sketch.update(column)  # type: ignore[attr-defined]

        fns["KLL k=200 x 64 columns"] = feed_kll
    samples = interleaved(fns, rounds, target_s)
    return {name: statistics.median(s) for name, s in samples.items()}


def _bind(stat: RunningQuantiles, x: torch.Tensor) -> Callable[[], None]:
    return lambda: stat.update(x)


def _sync_worker(rank: int, world: int, port: int, k: int, f: int, reps: int, out: str) -> None:
    """Time syncs of K moments alone and with K sketches; rank 0 writes the figures."""
    import torch.distributed as dist
    from sync import _init, _time, _write

    _init(rank, world, port)
    g = torch.Generator().manual_seed(rank)
    moments = {f"m{i}": RunningMoments(f) for i in range(k)}
    sketches = {f"q{i}": RunningQuantiles(f) for i in range(k)}
    results = {}
    for label, stats in (("moments", moments), ("with sketches", {**moments, **sketches})):

        def feed(stats: dict[str, Any] = stats) -> None:
            for stat in stats.values():
                stat.update(torch.randn(32, f, generator=g) * (1 + rank))

        feed()
        report = sync_stats(stats)
        times = _time(lambda stats=stats: sync_stats(stats), reps, feed)
        results[label] = {"ms": 1e3 * statistics.median(times), "collectives": report.n_collectives,
                          "bytes": report.n_bytes}
    dist.barrier()
    _write(rank, results, out)


def sync_figures(quick: bool) -> tuple[int, int, dict[str, dict[str, float]]]:
    from sync import _spawn

    k, f = (8, 16) if quick else (64, 32)
    return k, f, _spawn(_sync_worker, k, f, 3 if quick else 11)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="less data, fewer rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 20_480 if args.quick else 204_800
    f = 4 if args.quick else 16
    rounds = 5 if args.quick else 31
    target_s = 0.02 if args.quick else 0.05
    print(
        f"RunningQuantiles vs numpy.quantile and DataSketches KLL (k={KLL_K}) | torch "
        f"{torch.__version__}, numpy {np.__version__}, {platform.machine()}, torch threads "
        f"{torch.get_num_threads()}"
    )

    print(f"\naccuracy: {n} float32 rows x {f} features in batches of 4096; largest relative "
          "value error over the features")
    head = f"{'data':<16}" + "".join(f"{'sketch q=' + str(q):>15}" for q in QS)
    head += "".join(f"{'KLL q=' + str(q):>13}" for q in QS)
    print(head)
    print("-" * len(head))
    acc = accuracy(n, f, args.seed)
    for kind, errs in acc.items():
        sketch_err, kll_err = errs["sketch"], errs["kll"]
        assert sketch_err is not None
        kll_cells = ["n/a"] * 3 if kll_err is None else [f"{e:.2e}" for e in kll_err]
        print(f"{kind:<16}" + "".join(f"{e:>15.2e}" for e in sketch_err)
              + "".join(f"{c:>13}" for c in kll_cells))

    print(f"\nspeed: one {SPEED_SHAPE[0]}x{SPEED_SHAPE[1]} float32 batch per update, median "
          f"over {rounds} interleaved rounds")
    values = SPEED_SHAPE[0] * SPEED_SHAPE[1]
    try:
        times = speed(rounds, target_s, args.seed)
    except Exception as err:  # a broken baseline must not hide the accuracy figures
        times = {}
        print(f"speed not measured: {first_line(err)}")
    for name, t in times.items():
        print(f"{name:<36} {t * 1e3:>8.3f} ms  {values / t / 1e6:>8.1f} M values/s")

    sync_line = "sketches' extra collectives: not measured"
    try:
        k, f, figures = sync_figures(args.quick)
        print(f"\nsync at 2 gloo ranks: K={k} stats of {f} features, median over the timed syncs")
        for label, r in figures.items():
            print(f"{label:<36} {r['ms']:>8.2f} ms  {int(r['collectives'])} collectives  "
                  f"{r['bytes'] / 2**20:>8.2f} MiB per rank")
        extra = int(figures["with sketches"]["collectives"] - figures["moments"]["collectives"])
        verdict = "PASS" if extra <= 2 else "FAIL"
        sync_line = f"sketches' extra collectives: +{extra}  target <= +2  {verdict}"
    except Exception as err:  # a failed sync run must not hide the other figures
        print(f"sync not measured: {first_line(err)}")

    print()
    print(sync_line)
    for kind, errs in acc.items():
        worst = float(np.max(errs["sketch"]))  # type: ignore[arg-type]
        print(ratio_line(f"max relative error at q=0.01/0.5/0.99 / relative_accuracy, {kind}",
                         worst / 0.01, 1.0))
    kll_time = times.get("KLL k=200 x 64 columns")
    for policy in POLICIES:
        label = f"RunningQuantiles.update ({policy}) / KLL k=200 update, 4096x64 float32"
        mine = times.get(f"RunningQuantiles.update ({policy})")
        if kll_time is None or mine is None:
            print(failed_line(label, "datasketches is not installed or the run failed",
                              SPEED_TARGET))
        else:
            print(ratio_line(label, mine / kll_time, round(SPEED_TARGET, 3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
