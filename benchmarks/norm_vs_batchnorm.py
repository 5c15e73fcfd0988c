"""Benchmark ``RunningNorm`` against ``nn.BatchNorm1d(affine=False)``, eager and compiled.

Run from the repository root::

    .venv/bin/python benchmarks/norm_vs_batchnorm.py            # full run, about a minute
    .venv/bin/python benchmarks/norm_vs_batchnorm.py --quick    # a smoke test

Eager (one torch thread, float32 data with mean 100 and std 3): the module's forward in train mode
(RunningNorm: update the exact running statistics, then normalise by them; BatchNorm: batch
statistics, running-average update, normalise) and in eval mode (normalise only), on 256x64 and
4096x512 batches. Compiled (inductor): a training step (forward, backward, SGD step) of a small MLP
whose first layer is the normaliser. Every pair is timed interleaved in the same run (the minimum
over rounds of short back-to-back measurements, which machine noise can only lengthen) and
printed as a ratio RunningNorm / BatchNorm. Targets: eager <= 1.3x, compiled step <= 1.2x.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

try:  # run as a script from a checkout without an installed package
    import statplug  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from statplug import RunningNorm

SHAPES = ((256, 64), (4096, 512))
EAGER_TARGET = 1.3
COMPILED_TARGET = 1.2


def _time_pair(fns: dict[str, Callable[[], object]], rounds: int, target_s: float) -> dict:
    """Min over interleaved rounds of the per-call time of each function, in microseconds."""
    reps = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < target_s:
            fn()
            n += 1
        reps[name] = max(1, n)
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            fn, n = fns[name], reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e6)
    return best


def eager_rows(rounds: int, target_s: float) -> list[tuple[str, float, float]]:
    rows = []
    for n, f in SHAPES:
        x = torch.randn(n, f) * 3 + 100
        for mode in ("train", "eval"):
            norm = RunningNorm(f)
            bn = nn.BatchNorm1d(f, affine=False)
            norm.train(mode == "train"), bn.train(mode == "train")
            if mode == "eval":  # normalise by statistics that have seen data
                norm.train()(x)
                norm.eval()
                bn.train()(x)
                bn.eval()
            with torch.no_grad():
                t = _time_pair({"RunningNorm": lambda: norm(x), "BatchNorm1d": lambda: bn(x)},
                               rounds, target_s)
            rows.append((f"{n}x{f} {mode}", t["RunningNorm"], t["BatchNorm1d"]))
    return rows


def _mlp(first: nn.Module) -> nn.Module:
    return nn.Sequential(first, nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def compiled_row(rounds: int, target_s: float) -> tuple[str, float, float]:
    x = torch.randn(256, 64) * 3 + 100
    y = torch.randint(0, 10, (256,))
    steps = {}
    for name, first in (("RunningNorm", RunningNorm(64, nan_policy="propagate")),
                        ("BatchNorm1d", nn.BatchNorm1d(64, affine=False))):
        torch.manual_seed(0)
        model = _mlp(first)
        compiled = torch.compile(model, fullgraph=True)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(compiled: nn.Module = compiled, opt: torch.optim.Optimizer = opt) -> None:
            loss = nn.functional.cross_entropy(compiled(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    t = _time_pair(steps, rounds, target_s)
    return "MLP step 256x64 (inductor)", t["RunningNorm"], t["BatchNorm1d"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, for smoke tests")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip the inductor step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, target_s = (3, 0.01) if args.quick else (15, 0.05)
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"{'quick' if args.quick else 'full'} run; min over {rounds} interleaved rounds")
    print(f"{'case':<30} {'RunningNorm us':>15} {'BatchNorm1d us':>15} {'ratio':>7} target")
    rows = eager_rows(rounds, target_s)
    if not args.no_compile:
        rows.append(compiled_row(rounds, target_s))
    for label, ours, theirs in rows:
        target = COMPILED_TARGET if "inductor" in label else EAGER_TARGET
        ratio = ours / theirs
        flag = "ok" if ratio <= target else "OVER"
        print(f"{label:<30} {ours:>15.1f} {theirs:>15.1f} {ratio:>6.2f}x <={target}x {flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
