"""Benchmark: ``RunningNorm`` against the torch-native normalisers users run instead.

Run from the repository root::

    python benchmarks/norm_vs_peers.py              # full run
    python benchmarks/norm_vs_peers.py --quick      # a smoke test (the compiled step included)
    python benchmarks/norm_vs_peers.py --no-compile # skip the inductor section

One torch thread by default (``--threads``): the peers' costs are compared, not the machine's
thread pool. Every pair runs in interleaved blocks in the same run; the figures are medians of
blocks and each ratio is RunningNorm's median over the peer's.

* **rsl_rl's ``EmpiricalNormalization``** (the RL normaliser of the rsl_rl library; its train step
  is ``update(x)`` then ``forward(x)``, as its models call it) against a ``RunningNorm`` train-mode
  call, on 256x64 and 4096x512 float32 batches, for data of mean 0 / std 1 and of mean 1e4 /
  std 1 (where ``RunningNorm``'s exactness may cost a second pass). Target <= 1x. It also feeds
  both the same stream of mean-1e4 / std-1 batches (256x64, 4096x512, and single rows of 64
  features as an RL loop feeds them) and prints each one's largest relative error of the variance
  against a float64 numpy reference over all rows: ``RunningNorm`` must stay within 1e-3
  (DESIGN.md; the line names its accumulator dtype); rsl_rl keeps float32 state and merges
  with a running-average update rule.
* **``nn.BatchNorm1d(affine=False)``**, eager, on mean-0 data: train mode (batch statistics,
  running-average update, normalisation) <= 2x on 256x64 and <= 1.2x on 4096x512; eval mode
  (normalise only, after the statistics have seen data) <= 1.3x on both.
* **A compiled MLP training step** (inductor, ``dynamic=True``, ``fullgraph=True``): forward,
  cross-entropy, backward and an SGD step of ``normaliser -> Linear(64, 128) -> ReLU ->
  Linear(128, 10)``, over batch sizes 256, 256, 192 and a ragged 77 (one timed call = those four
  steps), with ``RunningNorm(64, nan_policy="propagate")`` (the policy DESIGN.md promises to
  compile with ``fullgraph=True``) against ``BatchNorm1d``. Target <= 1.2x. A normaliser that does
  not compile is reported as a failed line, and the run goes on. After timing, the compiled
  ``RunningNorm``'s count is checked against the rows fed, so a compiled path that loses updates
  cannot pass as fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from rsl_rl.modules import EmpiricalNormalization
from torch import nn

try:  # run as a script from a checkout without an installed package
    import statplug  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import failed_line, first_line, interleaved, median_us, ratio_line

from statplug import RunningNorm

SHAPES = ((256, 64), (4096, 512))
RSL_TARGET = 1.0
BN_TRAIN_TARGETS = {(256, 64): 2.0, (4096, 512): 1.2}
BN_EVAL_TARGET = 1.3
COMPILED_TARGET = 1.2
COMPILED_BATCHES = (256, 256, 192, 77)
EXACT_TOLERANCE = 1e-3


def make_data(rows: int, features: int, mean: float, seed: int) -> torch.Tensor:
    """float32 normal data of std 1 around ``mean``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, features, generator=g) + mean


def rsl_train_step(norm: EmpiricalNormalization, x: torch.Tensor) -> torch.Tensor:
    """rsl_rl's train step: learn the batch, then normalise it (as its MLP model does)."""
    norm.update(x)
    return norm(x)


def rsl_rows(shape: tuple[int, int], rounds: int, target_s: float) -> list[str]:
    """RunningNorm's train call against EmpiricalNormalization's, at mean 0 and mean 1e4."""
    out = []
    for mean in (0.0, 1e4):
        x = make_data(*shape, mean, seed=1)
        ours, theirs = RunningNorm(shape[1]), EmpiricalNormalization(shape[1])
        fns = {"ours": lambda: ours(x), "rsl": lambda: rsl_train_step(theirs, x)}
        us = {k: median_us(v) for k, v in interleaved(fns, rounds, target_s).items()}
        case = f"{shape[0]}x{shape[1]} mean {mean:g}"
        out.append(f"{case}: RunningNorm {us['ours']:.1f} us, EmpiricalNormalization "
                   f"{us['rsl']:.1f} us (medians, train step)")
        out.append(ratio_line(f"RunningNorm / rsl_rl EmpiricalNormalization {case}",
                              us["ours"] / us["rsl"], RSL_TARGET))
    return out


def variance_errors(shape: tuple[int, int], batches: int) -> str:
    """Both normalisers fed the same mean-1e4 batches: max relative variance error vs float64."""
    data = make_data(batches * shape[0], shape[1], 1e4, seed=2)
    ours, theirs = RunningNorm(shape[1]), EmpiricalNormalization(shape[1])
    for x in data.split(shape[0]):
        ours(x)
        rsl_train_step(theirs, x)
    ref = np.var(data.numpy().astype(np.float64), axis=0)

    def err(var: torch.Tensor) -> float:
        return float(np.max(np.abs(var.double().reshape(-1).numpy() - ref) / ref))

    e_ours, e_rsl = err(ours.var), err(theirs._var)
    flag = "ok" if e_ours <= EXACT_TOLERANCE else "NOT EXACT"
    acc = str(ours.mean.dtype).removeprefix("torch.")
    return (f"variance error, {batches} batches of {shape[0]}x{shape[1]} (mean 1e4, std 1) vs "
            f"float64: RunningNorm ({acc} accumulators) {e_ours:.1e} ({flag}, tolerance "
            f"{EXACT_TOLERANCE:g}), rsl_rl EmpiricalNormalization {e_rsl:.1e}")


def batchnorm_rows(shape: tuple[int, int], rounds: int, target_s: float) -> list[str]:
    """RunningNorm against BatchNorm1d(affine=False), eager, in train and in eval mode."""
    x = make_data(*shape, 0.0, seed=3)
    out = []
    for mode in ("train", "eval"):
        ours, bn = RunningNorm(shape[1]), nn.BatchNorm1d(shape[1], affine=False)
        if mode == "eval":  # normalise by statistics that have seen data
            ours(x), bn(x)
            ours.eval(), bn.eval()
        fns = {"ours": lambda: ours(x), "bn": lambda: bn(x)}
        us = {k: median_us(v) for k, v in interleaved(fns, rounds, target_s).items()}
        case = f"{shape[0]}x{shape[1]} {mode}"
        target = BN_TRAIN_TARGETS[shape] if mode == "train" else BN_EVAL_TARGET
        out.append(f"{case}: RunningNorm {us['ours']:.1f} us, BatchNorm1d {us['bn']:.1f} us "
                   "(medians, eager)")
        out.append(ratio_line(f"RunningNorm / BatchNorm1d {case}", us["ours"] / us["bn"], target))
    return out


class CompiledStep:
    """One timed call: a training step of a compiled MLP on each batch size in turn."""

    def __init__(self, first: nn.Module) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(first, nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.compiled = torch.compile(self.model, dynamic=True, fullgraph=True)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(4)
        self.batches = [
            (torch.randn(n, 64, generator=g) * 3 + 100, torch.randint(0, 10, (n,), generator=g))
            for n in COMPILED_BATCHES
        ]
        self.rows_fed = 0

    def __call__(self) -> None:
        for x, y in self.batches:
            loss = nn.functional.cross_entropy(self.compiled(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.rows_fed += x.shape[0]


def compiled_rows(rounds: int, target_s: float) -> list[str]:
    """The compiled MLP step with RunningNorm against the same with BatchNorm1d."""
    label = "compiled MLP step RunningNorm / BatchNorm1d (inductor, dynamic batch)"
    steps = {"ours": CompiledStep(RunningNorm(64, nan_policy="propagate")),
             "bn": CompiledStep(nn.BatchNorm1d(64, affine=False))}
    broken = {}
    for name, step in steps.items():
        try:
            step()  # compiles for every batch size (a failure shows here, not mid-timing)
        except Exception as exc:  # report a normaliser that does not compile, keep going
            broken[name] = first_line(exc)
    if broken:
        which = "RunningNorm" if "ours" in broken else "BatchNorm1d"
        out = [failed_line(label, f"{which} did not compile: {next(iter(broken.values()))}",
                           COMPILED_TARGET)]
        if "bn" not in broken:  # still show what the baseline costs
            bn_us = median_us(interleaved({"bn": steps["bn"]}, rounds, target_s)["bn"])
            out.append(f"compiled MLP step over batches {'/'.join(map(str, COMPILED_BATCHES))}: "
                       f"BatchNorm1d {bn_us:.1f} us (median)")
        return out
    samples = interleaved(steps, rounds, target_s)
    us = {k: median_us(v) for k, v in samples.items()}
    norm = steps["ours"].model[0]
    count_ok = int(norm.count) == steps["ours"].rows_fed
    out = [f"compiled MLP step over batches {'/'.join(map(str, COMPILED_BATCHES))}: RunningNorm "
           f"{us['ours']:.1f} us, BatchNorm1d {us['bn']:.1f} us (medians); RunningNorm count "
           f"{int(norm.count)} for {steps['ours'].rows_fed} rows fed "
           f"{'ok' if count_ok else 'LOST UPDATES'}"]
    if count_ok:
        out.append(ratio_line(label, us["ours"] / us["bn"], COMPILED_TARGET))
    else:
        out.append(failed_line(label, "the compiled RunningNorm lost updates", COMPILED_TARGET))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few short rounds, for smoke tests")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the inductor section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, target_s = (5, 0.01) if args.quick else (21, 0.04)
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"{'quick' if args.quick else 'full'} run: median of {rounds} interleaved blocks of "
          f"~{target_s * 1e3:g} ms")
    for shape in SHAPES:
        print("\n".join(rsl_rows(shape, rounds, target_s)))
    # The two benchmarked shapes, and a single-row stream (one observation per RL step), where
    # rounding accumulates over many small merges.
    streams = ((*SHAPES, (1, 64)), (20, 3, 2000) if args.quick else (100, 10, 20000))
    for shape, batches in zip(*streams, strict=True):
        print(variance_errors(shape, batches))
    for shape in SHAPES:
        print("\n".join(batchnorm_rows(shape, rounds, target_s)))
    if not args.no_compile:
        print("\n".join(compiled_rows(rounds, target_s)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
