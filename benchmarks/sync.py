"""Benchmark: one statplug sync against torchmetrics and a naive per-buffer all_reduce loop.

Two gloo ranks on CPU (real processes). For K = 1, 16, 64, 256 stats of shape (64,) it times:
- ``statplug``: ``sync_stats`` over K ``RunningMoments`` (mean and variance, exact);
- ``flat``: one ``all_reduce`` of a float64 buffer as large as statplug's payload (the floor);
- ``torchmetrics``: K ``MeanMetric`` plus K variance metrics (count, sum, sum of squares states)
  synced by ``compute()``;
- ``naive``: one ``all_reduce`` per buffer (count, mean, M2 per stat; means averaged unweighted,
  which is also wrong for uneven counts);
- ``statplug`` after update: the same sync right after one more batch of 32 rows per stat, so it
  also folds each stat's deferred small-batch work (set-up untimed).
statplug, the floor and the after-update sync run in interleaved blocks (a block of reps of each
in turn, several rounds), so each is timed in its steady state and machine noise hits them
alike; the per-buffer loops (up to seconds per call) run a few reps. The median time per call is
printed (and the minimum, for statplug and the floor) with the number of collectives each made
(counted by wrapping ``torch.distributed``'s collectives, which still run).

The torchmetrics section times, for K = 1, 16, 64, 256 metrics of mixed kinds (means, sums,
max/min, multiclass accuracy, cat and AUROC list states, MSE), ``compute()`` of every metric:
inside one ``statplug.sync_metrics`` block against torchmetrics' own per-metric sync, in the same
processes, interleaved the same way.

Run: ``python benchmarks/sync.py [--quick] [--only {stats,metrics}] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

KS = (1, 16, 64, 256)
SHAPE = 64
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
               "all_gather_object", "reduce", "gather")


class _Counter:
    def __init__(self) -> None:
        self.calls = 0
        for name in COLLECTIVES:
            fn = getattr(dist, name)

            def counted(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
                self.calls += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)
            # torchmetrics imports the functions it uses from torch.distributed at call time
            # through the module, so patching the module attribute is enough.


def _time(fn: Any, reps: int, before: Any = None) -> list[float]:
    out = []
    for _ in range(reps):
        if before is not None:
            before()  # untimed set-up
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _worker(rank: int, world: int, port: int, quick: bool, only: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torchmetrics

    from statplug import RunningMoments, sync_stats

    counter = _Counter()

    class VarMetric(torchmetrics.Metric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("n", torch.zeros(()), dist_reduce_fx="sum")
            self.add_state("s", torch.zeros(SHAPE), dist_reduce_fx="sum")
            self.add_state("ss", torch.zeros(SHAPE), dist_reduce_fx="sum")

        def update(self, x: torch.Tensor) -> None:
            self.n += x.shape[0]
            self.s += x.sum(0)
            self.ss += (x * x).sum(0)

        def compute(self) -> torch.Tensor:
            return self.ss / self.n - (self.s / self.n) ** 2

    # statplug and the flat floor are cheap: many interleaved reps, so the medians are stable on
    # a noisy 2-core machine. The per-buffer loops cost up to seconds: a few reps.
    fast_reps = 40 if quick else 150
    slow_reps = 2 if quick else 5
    results: dict[str, Any] = {}
    for k in KS if only != "metrics" else ():
        torch.manual_seed(rank)
        x = torch.randn(32 + rank, SHAPE)
        stats = [RunningMoments(SHAPE) for _ in range(k)]
        fed = [RunningMoments(SHAPE) for _ in range(k)]
        means = [torchmetrics.MeanMetric() for _ in range(k)]
        variances = [VarMetric() for _ in range(k)]
        buffers = []
        for s, f, m, v in zip(stats, fed, means, variances, strict=True):
            s.update(x)
            f.update(x)
            m.update(x)
            v.update(x)
            buffers += [s.count.clone().double(), s.mean.clone(), s.m2.clone()]

        def run_statplug() -> None:
            # After the first sync the local part is empty, but the sync does the same work.
            sync_stats(stats)

        def feed() -> None:
            for f in fed:
                f.update(x)

        def run_fed() -> None:
            # A sync right after one more batch per stat: folds those updates' deferred work too.
            sync_stats(fed)

        payload = sync_stats(stats).n_bytes // 8
        sync_stats(fed)
        flat = torch.zeros(payload, dtype=torch.float64)

        def run_flat() -> None:
            dist.all_reduce(flat)

        def run_torchmetrics() -> None:
            for m, v in zip(means, variances, strict=True):
                m._computed = None
                v._computed = None
                m.compute()
                v.compute()

        def run_naive() -> None:
            for b in buffers:
                dist.all_reduce(b)

        cands = {"statplug": run_statplug, "flat": run_flat, "statplug_fed": run_fed,
                 "naive": run_naive, "torchmetrics": run_torchmetrics}
        setup = {"statplug_fed": feed}
        times: dict[str, list[float]] = {c: [] for c in cands}
        calls: dict[str, int] = {}
        for c, fn in cands.items():  # warm-up, and count collectives of one call
            if c in setup:
                setup[c]()
            fn()
            if c in setup:
                setup[c]()
            before = counter.calls
            fn()
            calls[c] = counter.calls - before
        # Interleaved blocks: each fast candidate runs a block of reps in turn, for several
        # rounds, so each is timed in its steady state and machine noise hits all alike.
        rounds = 4 if quick else 6
        for _ in range(rounds):
            for c in ("statplug", "flat", "statplug_fed"):
                times[c] += _time(cands[c], fast_reps // rounds, setup.get(c))
        for c in ("naive", "torchmetrics"):
            times[c] += _time(cands[c], slow_reps if k >= 64 else 2 * slow_reps)
        results[str(k)] = {
            c: {"ms": 1e3 * statistics.median(times[c]), "min_ms": 1e3 * min(times[c]),
                "collectives": calls[c], "reps": len(times[c])}
            for c in cands
        }
        results[str(k)]["payload_bytes"] = payload * 8
    results = {"stats": results,
               "metrics": _metric_section(rank, counter, quick) if only != "stats" else {}}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _mixed_metrics(k: int) -> list[Any]:
    """K torchmetrics metrics, cycling through kinds that use every sync route."""
    import torchmetrics
    from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy

    kinds = (
        torchmetrics.MeanMetric,
        torchmetrics.SumMetric,
        torchmetrics.MaxMetric,
        torchmetrics.MinMetric,
        lambda: MulticlassAccuracy(num_classes=8),
        torchmetrics.CatMetric,
        BinaryAUROC,
        torchmetrics.MeanSquaredError,
    )
    return [kinds[i % len(kinds)]() for i in range(k)]


def _feed(metrics: list[Any], rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    n = 32 + rank
    x, t = torch.rand(n, generator=g), torch.randint(0, 8, (n,), generator=g)
    for m in metrics:
        name = type(m).__name__
        if name == "MulticlassAccuracy":
            m.update(torch.randn(n, 8, generator=g), t)
        elif name == "BinaryAUROC":
            m.update(x, t % 2)
        elif name == "MeanSquaredError":
            m.update(x, x.flip(0))
        else:
            m.update(x)


def _metric_section(rank: int, counter: _Counter, quick: bool) -> dict[str, Any]:
    from statplug import sync_metrics

    fast_reps = 40 if quick else 150
    slow_reps = 2 if quick else 5
    results: dict[str, Any] = {}
    for k in KS:
        metrics = _mixed_metrics(k)
        _feed(metrics, rank)

        def run_statplug() -> None:
            with sync_metrics(metrics):
                pass

        def run_torchmetrics() -> None:
            for m in metrics:
                m.sync()  # what compute() does around the metric's own compute
                m.unsync()

        def run_statplug_compute() -> None:
            with sync_metrics(metrics):
                for m in metrics:
                    m.compute()

        def run_torchmetrics_compute() -> None:
            for m in metrics:
                m._computed = None  # each call must sync and compute again
                m.compute()

        cands = {"statplug": run_statplug, "torchmetrics": run_torchmetrics,
                 "statplug_compute": run_statplug_compute,
                 "torchmetrics_compute": run_torchmetrics_compute}
        times: dict[str, list[float]] = {c: [] for c in cands}
        calls: dict[str, int] = {}
        for c, fn in cands.items():  # warm-up, and count collectives of one call
            fn()
            before = counter.calls
            fn()
            calls[c] = counter.calls - before
        rounds = 4 if quick else 6
        for _ in range(rounds):
            for c in ("statplug", "statplug_compute"):
                times[c] += _time(cands[c], fast_reps // rounds)
        for c in ("torchmetrics", "torchmetrics_compute"):
            times[c] += _time(cands[c], slow_reps if k >= 64 else 2 * slow_reps)
        results[str(k)] = {
            c: {"ms": 1e3 * statistics.median(times[c]), "min_ms": 1e3 * min(times[c]),
                "collectives": calls[c], "reps": len(times[c])}
            for c in cands
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--only", choices=("stats", "metrics"), help="run one section only")
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sync.json")
        mp.start_processes(
            _worker, args=(2, port, args.quick, args.only, out), nprocs=2, start_method="spawn"
        )
        with open(out) as f:
            results = json.load(f)
    if results["stats"]:
        _print_stats(results["stats"])
    if results["metrics"]:
        _print_metrics(results["metrics"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _print_stats(results: dict[str, Any]) -> None:
    print("sync of K RunningMoments(64) stats, 2 gloo ranks on CPU (median ms per sync; "
          "min in brackets for statplug and the floor)")
    header = (f"{'K':>4} {'statplug':>16} {'flat (floor)':>16} {'vs flat':>8} "
              f"{'after update':>13} {'naive':>8} {'torchmetrics':>13} {'tm/statplug':>12}  "
              "collectives s/n/tm")
    print(header)
    for k, r in results.items():
        sp, fl, fed, nv, tm = (
            r[c]["ms"] for c in ("statplug", "flat", "statplug_fed", "naive", "torchmetrics")
        )
        sp_min, fl_min = r["statplug"]["min_ms"], r["flat"]["min_ms"]
        colls = "/".join(str(r[c]["collectives"]) for c in ("statplug", "naive", "torchmetrics"))
        print(f"{k:>4} {sp:7.3f} ({sp_min:6.3f}) {fl:7.3f} ({fl_min:6.3f}) {sp / fl:8.2f} "
              f"{fed:13.3f} {nv:8.2f} {tm:13.2f} {tm / sp:12.1f}  {colls}")
    print("vs flat: median / median.")
    print("after update: statplug right after one more batch per stat (the sync also folds that "
          "batch's deferred update work).")


def _print_metrics(results: dict[str, Any]) -> None:
    print()
    print("sync of K torchmetrics metrics of mixed kinds, 2 gloo ranks on CPU (median ms for all "
          "K): statplug's sync_metrics block against torchmetrics' own sync()+unsync() of each; "
          "then compute() of every metric, inside the block against torchmetrics' compute()")
    print(f"{'K':>4} {'statplug':>9} {'torchmetrics':>13} {'tm/statplug':>12} "
          f"{'+compute: statplug':>19} {'torchmetrics':>13} {'tm/statplug':>12}  "
          "collectives s/tm")
    for k, r in results.items():
        sp, tm = r["statplug"]["ms"], r["torchmetrics"]["ms"]
        spc, tmc = r["statplug_compute"]["ms"], r["torchmetrics_compute"]["ms"]
        colls = f"{r['statplug']['collectives']}/{r['torchmetrics']['collectives']}"
        print(f"{k:>4} {sp:9.2f} {tm:13.2f} {tm / sp:12.1f} {spc:19.2f} {tmc:13.2f} "
              f"{tmc / spc:12.1f}  {colls}")


if __name__ == "__main__":
    sys.exit(main())
