"""Shared timing and reporting helpers of the benchmarks (one process, no torch.distributed).

Every benchmark compares a statplug call with a baseline measured in the same run: the callables
run in *interleaved blocks* (each round runs a block of back-to-back calls of every candidate, in
an order rotated per round) so machine noise hits all of them alike, and the figure of a
candidate is the median over rounds of its per-call time in a block. A ratio is the median of the
candidate over the median of its baseline.

Each target is printed as one line starting with ``ratio`` so tests and readers find them::

    ratio RunningNorm 1x4 / NormalizeObservation: 1.21x  target <= 1.5x  PASS
    ratio plain torch ops / NormalizeObservation: 0.93x  (info)
    ratio masked / unmasked 4096x512: n/a (no mask support yet)
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable

Fn = Callable[[], object]


def time_block(fn: Fn, reps: int, max_s: float = math.inf) -> float:
    """Seconds per call over ``reps`` back-to-back calls of ``fn`` (fewer past ``max_s``)."""
    t0 = time.perf_counter()
    limit = t0 + max_s
    for i in range(reps):
        fn()
        # A loaded machine must not stretch one block without bound (a call calibrated at
        # 30 us can take milliseconds when the thread pool is descheduled).
        if time.perf_counter() > limit:
            return (time.perf_counter() - t0) / (i + 1)
    return (time.perf_counter() - t0) / reps


def calibrate(fn: Fn, target_s: float) -> int:
    """Warm ``fn`` up and return the number of calls that takes about ``target_s``."""
    for _ in range(3):
        fn()
    per_call = min(time_block(fn, 1) for _ in range(3))
    if per_call < target_s / 10:  # one call is too short to time alone: time a few
        per_call = time_block(fn, max(1, int(target_s / 10 / per_call)))
    return max(1, round(target_s / per_call))


def interleaved(fns: dict[str, Fn], rounds: int, target_s: float) -> dict[str, list[float]]:
    """Per-call seconds of every function, one sample per round (interleaved blocks).

    The number of calls in a block is calibrated per function so one block takes about
    ``target_s`` (a block that overruns 4x that stops early); the garbage collector is off
    while timing (collected between rounds).
    """
    reps = {name: calibrate(fn, target_s) for name, fn in fns.items()}
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(time_block(fns[name], reps[name], 4 * target_s))
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def median_us(samples: list[float]) -> float:
    """The median of per-call seconds, in microseconds."""
    return statistics.median(samples) * 1e6


def ratio_line(label: str, ratio: float, target: float | None = None) -> str:
    """One ``ratio`` line: the figure, and the target with PASS/FAIL (or ``(info)``)."""
    if target is None:
        return f"ratio {label}: {ratio:.2f}x  (info)"
    verdict = "PASS" if ratio <= target else "FAIL"
    return f"ratio {label}: {ratio:.2f}x  target <= {target:g}x  {verdict}"


def failed_line(label: str, reason: str, target: float | None = None) -> str:
    """A ``ratio`` line for a measurement that could not be made (counts as FAIL on a target)."""
    tail = f"  target <= {target:g}x  FAIL" if target is not None else ""
    return f"ratio {label}: not measured ({reason}){tail}"


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, shortened: enough to recognise an error."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
