"""Benchmark: statplug's syncs on 2 gloo ranks (real processes) against what DDP and torch pay.

Run: ``python benchmarks/sync.py [--quick] [--only {stats,big,metrics}] [--features N]
[--json PATH]``. Each section runs in its own pair of fresh processes (free port, one torch
thread each); the figures are rank 0's.

**stats**: for K = 1, 16, 64, 256 ``RunningMoments(64)`` stats held in one module, ranks fed
different data, it times per call, in interleaved blocks (a block of calls of each candidate in
turn, rotated per round; a barrier before each call; median over all calls):

- ``sync_stats`` right after one more batch of 32 rows per stat (feeding untimed): the sync a
  training loop pays at each epoch end;
- ``sync_stats`` with nothing new since the last sync;
- DDP's buffer sync: ``torch.distributed._broadcast_coalesced(group, buffers, 250 MiB, 0)`` over
  *all* the module's buffers (``named_buffers()``, as DDP collects them), with DDP's default
  broadcast bucket size. It runs on a deep copy of the module, so it never overwrites the stats
  being synced. This is what DDP already pays before every forward pass; target <= 2.5x at K=256
  for both syncs (the other K are printed for information);
- one ``all_reduce`` of a flat tensor of the sync's payload size (``SyncReport.n_bytes``), the
  previous round's floor, for information.

**big**: one ``RunningMoments`` of ``--features`` features (default 50M; quick 5M), ranks fed
different data. It measures the very first sync (after new data, once), then in each round, after
feeding new data untimed: a sync after new data, a second sync with nothing new, one flat
``all_reduce`` of the first sync's payload (``SyncReport.n_bytes`` bytes, in the accumulator dtype)
and one of the state's bytes. Targets: the sync after new data <= 3x the first ``all_reduce``; peak
extra memory of the syncs after new data (the very first included) <= 3x their payload. The other
figures are for information. Memory: a thread samples the process's resident set
(``/proc/self/statm``) every millisecond during each call (the calls are timed with it running:
about 2% of a core); the peak minus the resident set just before the call is the extra memory,
printed as a multiple of the payload and of the state's bytes (``state_dict``). A sampler cannot
see a peak shorter than a few milliseconds; the big allocations that matter here take tens of
milliseconds to fill. To protect a shared machine, a rank whose extra memory passes both
``--memory-cap-gib`` (default 4 GiB) and 4x the payload (4x the state before the first payload is
known) stops at once and the section reports a failure: a stop always means the memory target
failed.

**metrics**: for K = 1, 16, 64, 256 torchmetrics metrics of mixed kinds (means, sums, max/min,
multiclass accuracy, cat and AUROC list states, MSE), ``compute()`` of every metric: inside one
``statplug.sync_metrics`` block against torchmetrics' own per-metric sync, in the same processes,
interleaved the same way. Collectives are counted by wrapping ``torch.distributed``'s functions.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

KS = (1, 16, 64, 256)
SHAPE = 64
DDP_BUCKET_BYTES = 250 * 1024 * 1024  # DistributedDataParallel.broadcast_bucket_size
K_TARGET = 2.5
BIG_TIME_TARGET = 3.0
BIG_MEMORY_TARGET = 3.0
BIG_TIME_LABEL = "big stat: sync after new data / flat all_reduce of the payload"
BIG_MEMORY_LABEL = "big stat: sync peak extra memory / payload (first and later syncs)"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
               "all_gather_object", "reduce", "gather")


class _Counter:
    """Counts calls of ``torch.distributed``'s collective functions (which still run)."""

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
    """Seconds of each of ``reps`` calls, all ranks starting together (a barrier each)."""
    out = []
    for _ in range(reps):
        if before is not None:
            before()  # untimed set-up
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))


def _write(rank: int, results: dict[str, Any], out_path: str) -> None:
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- stats


def _ddp_broadcast(buffers: list[torch.Tensor]) -> Callable[[], None]:
    """DDP's buffer sync of ``buffers``: one coalesced broadcast from rank 0, DDP's bucket size."""
    group = dist.group.WORLD

    def run() -> None:
        dist._broadcast_coalesced(group, buffers, DDP_BUCKET_BYTES, 0)

    return run


def _stats_case(k: int, rank: int, quick: bool) -> dict[str, Any]:
    """One K: every candidate timed in interleaved blocks; medians and collectives."""
    from statplug import RunningMoments, sync_stats

    torch.manual_seed(rank)
    x = torch.randn(32 + rank, SHAPE) + rank  # ranks see different data (and row counts)
    module = nn.ModuleList(RunningMoments(SHAPE) for _ in range(k))

    def feed() -> None:
        for stat in module:
            stat.update(x)

    feed()
    first = sync_stats(module)
    ddp_copy = copy.deepcopy(module)  # DDP's broadcast overwrites rank 1's copy, never the stats
    buffers = list(ddp_copy.buffers())
    flat = torch.zeros(first.n_bytes // 8, dtype=torch.float64)
    cands: dict[str, Callable[[], object]] = {
        "fed": lambda: sync_stats(module),
        "idle": lambda: sync_stats(module),
        "ddp": _ddp_broadcast(buffers),
        "flat": lambda: dist.all_reduce(flat),
    }
    setup = {"fed": feed}
    reports = {}
    for name in ("fed", "idle"):  # warm-up, and what one sync of each kind does
        if name in setup:
            setup[name]()
        reports[name] = cands[name]()
    rounds, block = (3, 5) if quick else (6, 20)
    names = list(cands)
    times: dict[str, list[float]] = {c: [] for c in cands}
    for r in range(rounds):
        for c in names[r % len(names):] + names[: r % len(names)]:
            times[c] += _time(cands[c], block, setup.get(c))
    buffer_bytes = sum(b.numel() * b.element_size() for b in buffers)
    by_dtype: dict[torch.dtype, int] = {}
    for b in buffers:
        by_dtype[b.dtype] = by_dtype.get(b.dtype, 0) + b.numel() * b.element_size()
    return {
        **{c: {"ms": 1e3 * statistics.median(t), "reps": len(t)} for c, t in times.items()},
        "collectives": {n: reports[n].n_collectives for n in reports},
        "payload_bytes": {n: reports[n].n_bytes for n in reports},
        "ddp_buffer_bytes": buffer_bytes,
        # torch buckets the tensors per dtype, each bucket one broadcast of up to 250 MiB
        "ddp_buckets": sum(math.ceil(n / DDP_BUCKET_BYTES) for n in by_dtype.values() if n),
    }


def _stats_worker(rank: int, world: int, port: int, quick: bool, out_path: str) -> None:
    _init(rank, world, port)
    results = {str(k): _stats_case(k, rank, quick) for k in KS}
    _write(rank, results, out_path)


def _print_stats(results: dict[str, Any]) -> None:
    print("sync of K RunningMoments(64) stats in one module, 2 gloo ranks on CPU, one thread each "
          "(median ms per call)")
    print(f"{'K':>4} {'after update':>13} {'nothing new':>12} {'DDP bcast':>10} "
          f"{'flat a_r':>9} {'upd/DDP':>8} {'idle/DDP':>9}  collectives upd/idle/DDP  "
          "payload B upd/idle, DDP buffers B")
    for k, r in results.items():
        fed, idle, ddp, flat = (r[c]["ms"] for c in ("fed", "idle", "ddp", "flat"))
        colls = f"{r['collectives']['fed']}/{r['collectives']['idle']}/{r['ddp_buckets']}"
        pay = f"{r['payload_bytes']['fed']}/{r['payload_bytes']['idle']}, {r['ddp_buffer_bytes']}"
        print(f"{k:>4} {fed:13.3f} {idle:12.3f} {ddp:10.3f} {flat:9.3f} {fed / ddp:8.2f} "
              f"{idle / ddp:9.2f}  {colls:>24}  {pay}")
    print("DDP bcast: torch.distributed._broadcast_coalesced of all the module's buffers from "
          "rank 0 (DDP's buffer sync, 250 MiB buckets, one bucket list per dtype; each bucket is "
          "one broadcast).")
    print("flat a_r: one all_reduce of a float64 tensor of the first sync's payload size.")
    for k, r in results.items():
        target = K_TARGET if k == "256" else None
        for c, what in (("fed", "after update"), ("idle", "nothing new")):
            print(_ratio(f"sync_stats {what} / DDP buffer broadcast, K={k}",
                         r[c]["ms"] / r["ddp"]["ms"], target))


# ---------------------------------------------------------------------------------- big


class PeakRSS:
    """Peak resident-set growth of this process during a ``with`` block, sampled in a thread.

    If ``cap_bytes`` is set and the growth passes it, prints why and ends the process at once
    (exit status 3): the other rank's collective then fails and the section reports it.
    """

    def __init__(self, cap_bytes: float = math.inf, interval_s: float = 0.001) -> None:
        self.cap_bytes, self.interval_s = cap_bytes, interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.extra = self.retained = 0

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            grown = self.rss() - self.base
            self.extra = max(self.extra, grown)
            if grown > self.cap_bytes:
                print(f"rank aborted: extra memory {grown / 2**20:.0f} MiB passed the cap of "
                      f"{self.cap_bytes / 2**20:.0f} MiB (--memory-cap-gib, or 4x the state or "
                      "payload when larger)", flush=True)
                os._exit(3)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.base = self.rss()
        self._stop = threading.Event()
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(self.interval_s)  # let the sampler in while Python code runs
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch)
        self.extra = max(self.extra, self.rss() - self.base)
        self.retained = self.rss() - self.base


def _measured(fn: Callable[[], object], cap_bytes: float) -> tuple[float, int, int, Any]:
    """Seconds, peak extra bytes, retained bytes and result of one call (after a barrier)."""
    dist.barrier()
    with PeakRSS(cap_bytes) as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return seconds, mem.extra, mem.retained, out


def _big_worker(rank: int, world: int, port: int, features: int, reps: int, cap_gib: float,
                out_path: str) -> None:
    _init(rank, world, port)
    from statplug import RunningMoments, sync_stats

    stat = RunningMoments(features)

    def feed() -> None:
        stat.update(torch.randn(2, features, generator=torch.Generator().manual_seed(rank)) + rank)

    state_bytes = sum(t.numel() * t.element_size() for t in stat.state_dict().values())
    calls: dict[str, list[dict[str, Any]]] = {c: [] for c in BIG_LABELS}
    cap_bytes = max(cap_gib * 2**30, 4 * state_bytes)

    def record(name: str, fn: Callable[[], object], n_bytes: int | None = None) -> None:
        seconds, extra, retained, out = _measured(fn, cap_bytes)
        calls[name].append({"s": seconds, "extra": extra, "retained": retained,
                            "n_bytes": out.n_bytes if n_bytes is None else n_bytes,
                            "collectives": getattr(out, "n_collectives", 1)})

    feed()
    record("first", lambda: sync_stats(stat))  # any plan the first sync builds is included
    payload = calls["first"][0]["n_bytes"]
    cap_bytes = max(cap_gib * 2**30, 4 * payload)
    # One buffer for both flat all_reduces (views of it), to spare a shared machine's memory.
    size = stat.mean.element_size()
    buffer = torch.zeros(max(payload, state_bytes) // size, dtype=stat.mean.dtype)
    flats = {name: (lambda v=buffer[: n // size]: dist.all_reduce(v), n)
             for name, n in (("flat", payload), ("flat_state", state_bytes))}
    for _ in range(reps):
        feed()
        record("fed", lambda: sync_stats(stat))
        record("idle", lambda: sync_stats(stat))
        for name, (fn, n_bytes) in flats.items():
            record(name, fn, n_bytes)
    results: dict[str, Any] = {
        name: {"s": statistics.median(c["s"] for c in cs),
               "extra_bytes": max(c["extra"] for c in cs),
               "extra_per_n_bytes": max(c["extra"] / max(c["n_bytes"], 1) for c in cs),
               "retained_bytes": max(c["retained"] for c in cs),
               "n_bytes": max(c["n_bytes"] for c in cs),
               "collectives": max(c["collectives"] for c in cs), "reps": len(cs)}
        for name, cs in calls.items()
    }
    results["meta"] = {"features": features, "state_bytes": state_bytes, "payload_bytes": payload,
                       "dtype": str(stat.mean.dtype).removeprefix("torch.")}
    _write(rank, results, out_path)


BIG_LABELS = {
    "first": "first sync ever (after new data)",
    "fed": "sync after new data",
    "idle": "second sync, nothing new",
    "flat": "flat all_reduce of the first payload",
    "flat_state": "flat all_reduce of the state's bytes",
}


def _print_big(results: dict[str, Any]) -> None:
    meta = results["meta"]
    state, payload = meta["state_bytes"], meta["payload_bytes"]
    mib = 2**20
    print(f"\none RunningMoments of {meta['features']:,} features ({meta['dtype']} "
          f"accumulators), 2 gloo ranks: state {state / mib:.0f} MiB (state_dict), first "
          f"sync's payload {payload / mib:.0f} MiB (SyncReport.n_bytes)")
    print(f"  {'call':<38} {'s (median)':>10} {'n_bytes MiB':>11} {'colls':>5} "
          f"{'peak extra MiB':>14} {'x n_bytes':>9} {'x state':>8} {'retained MiB':>12}")
    for name, label in BIG_LABELS.items():
        r = results[name]
        print(f"  {label:<38} {r['s']:10.3f} {r['n_bytes'] / mib:11.0f} {r['collectives']:5} "
              f"{r['extra_bytes'] / mib:14.0f} {r['extra_per_n_bytes']:9.2f} "
              f"{r['extra_bytes'] / state:8.2f} {r['retained_bytes'] / mib:12.0f}")
    print("  x n_bytes: peak extra memory over the call's own payload (max over calls); x state: "
          "over the state's bytes.")
    flat_s, fed, first = results["flat"]["s"], results["fed"], results["first"]
    print(_ratio(BIG_TIME_LABEL, fed["s"] / flat_s, BIG_TIME_TARGET))
    print(_ratio(BIG_MEMORY_LABEL, max(first["extra_per_n_bytes"], fed["extra_per_n_bytes"]),
                 BIG_MEMORY_TARGET))
    print(_ratio("big stat: sync after new data / flat all_reduce of the state's bytes",
                 fed["s"] / results["flat_state"]["s"]))
    print(_ratio("big stat: sync peak extra memory / state bytes",
                 max(first["extra_bytes"], fed["extra_bytes"]) / state))
    print(_ratio("big stat: first sync ever / flat all_reduce of the payload",
                 first["s"] / flat_s))
    print(_ratio("big stat: second sync, nothing new / flat all_reduce of the payload",
                 results["idle"]["s"] / flat_s))
    print(_ratio("big stat: second sync, nothing new, peak extra memory / payload",
                 results["idle"]["extra_per_n_bytes"]))


def _ratio(label: str, ratio: float, target: float | None = None) -> str:
    """One ``ratio`` line, the format of the other benchmarks' (see ``_timing.ratio_line``)."""
    if target is None:
        return f"ratio {label}: {ratio:.2f}x  (info)"
    return (f"ratio {label}: {ratio:.2f}x  target <= {target:g}x  "
            f"{'PASS' if ratio <= target else 'FAIL'}")


# ---------------------------------------------------------------------------------- metrics


def _metrics_worker(rank: int, world: int, port: int, quick: bool, out_path: str) -> None:
    _init(rank, world, port)
    counter = _Counter()
    _write(rank, _metric_section(rank, counter, quick), out_path)


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


def _spawn(worker: Callable[..., None], *args: Any) -> dict[str, Any]:
    """Run ``worker(rank, 2, port, *args, out_path)`` on 2 fresh processes; rank 0's results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sync.json")
        mp.start_processes(worker, args=(2, port, *args, out), nprocs=2, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 5M-feature big stat")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--only", choices=("stats", "big", "metrics"), help="one section only")
    parser.add_argument("--features", type=int, default=None,
                        help="features of the big stat (default 50M; quick 5M)")
    parser.add_argument("--memory-cap-gib", type=float, default=4.0,
                        help="stop the big section when a rank's extra memory during a call "
                        "passes this many GiB (default 4) and 4x the payload, to protect a "
                        "shared machine")
    args = parser.parse_args(argv)
    sections = (args.only,) if args.only else ("stats", "big", "metrics")
    results: dict[str, Any] = {}
    if "stats" in sections:
        results["stats"] = _spawn(_stats_worker, args.quick)
        _print_stats(results["stats"])
    if "big" in sections:
        features = args.features or (5_000_000 if args.quick else 50_000_000)
        reps = 1 if args.quick else 3
        try:
            results["big"] = _spawn(_big_worker, features, reps, args.memory_cap_gib)
        except Exception as exc:  # a rank stopped (memory cap) or crashed: report, go on
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            results["big"] = {"error": reason}
            print(f"\none RunningMoments of {features:,} features: the section failed ({reason})")
            for label, target in ((BIG_TIME_LABEL, BIG_TIME_TARGET),
                                  (BIG_MEMORY_LABEL, BIG_MEMORY_TARGET)):
                print(f"ratio {label}: not measured (section failed)  target <= {target:g}x  "
                      "FAIL")
        else:
            _print_big(results["big"])
    if "metrics" in sections:
        results["metrics"] = _spawn(_metrics_worker, args.quick)
        _print_metrics(results["metrics"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


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
    for k, r in results.items():
        print(_ratio(f"sync_metrics block / torchmetrics' own sync, K={k}",
                     r["statplug"]["ms"] / r["torchmetrics"]["ms"]))


if __name__ == "__main__":
    sys.exit(main())
