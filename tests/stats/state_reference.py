"""Float64 numpy references for the stats, written from their documented meaning (not their code).

Shared by the state fuzz (``test_state_fuzz.py``) and the property test
(``test_stats_property.py``). Each reference holds what the stat must hold after the same calls:

* ``MomentsRef``: every kept row (count, mean, population variance, ``m2 = count * var``);
* ``EMARef``: the exponentially weighted summary ``(weight, mean, var)``, each step a mixture of
  the old summary (weight ``weight * (1 - m)``) and the batch (weight ``m``), normalised; a merge
  is the mixture of two summaries weighted by their sample counts;
* ``MinMaxRef``: per-feature extremes, NaN sticking under ``"propagate"``.

``check(stat, ref)`` compares every read-out and every persistent raw buffer (``named_buffers()``,
not the properties) with the reference: counts exactly, floats within ``tolerance(acc)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from statplug import EMAMoments, RunningMinMax, RunningNorm

__all__ = [
    "EMARef",
    "MinMaxRef",
    "MomentsRef",
    "as_rows",
    "check",
    "kept_rows",
    "persistent",
    "reference_for",
    "same_bits",
]


def as_rows(x: torch.Tensor, n_features: int) -> np.ndarray:
    """The float64 values a stat sees for input ``x`` (after its own dtype conversion)."""
    t = x.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()  # exact
    return t.to(torch.float64).reshape(-1, n_features).numpy()


def kept_rows(rows: np.ndarray, policy: str) -> tuple[np.ndarray, int]:
    """(rows the stat keeps, rows it skips) under ``policy`` (raise never reaches here dirty)."""
    if policy != "skip":
        return rows, 0
    ok = np.isfinite(rows).all(axis=1)
    return rows[ok], int((~ok).sum())


@dataclass
class MomentsRef:
    n_features: int
    rows: list[np.ndarray] = field(default_factory=list)
    n_skipped: int = 0

    def data(self) -> np.ndarray:
        if not self.rows:
            return np.zeros((0, self.n_features))
        return np.concatenate(self.rows)

    def update(self, rows: np.ndarray, policy: str) -> None:
        kept, skipped = kept_rows(rows, policy)
        self.rows.append(kept)
        self.n_skipped += skipped

    def merge(self, other: MomentsRef) -> None:
        self.rows += other.rows
        self.n_skipped += other.n_skipped

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.rows)

    def expected(self) -> dict[str, np.ndarray]:
        d = self.data()
        n = len(d)
        if n == 0:
            z = np.zeros(self.n_features)
            return {"mean": z, "m2": z, "var": z}
        with np.errstate(invalid="ignore", over="ignore"):
            mean = d.mean(0)
            var = d.var(0)
        return {"mean": mean, "m2": var * n, "var": var}


@dataclass
class EMARef:
    n_features: int
    momentum: float
    weight: float = 0.0
    mean: np.ndarray = None  # type: ignore[assignment]
    var: np.ndarray = None  # type: ignore[assignment]
    count: int = 0
    n_skipped: int = 0

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.n_features)
        self.var = np.zeros(self.n_features)

    @staticmethod
    def _mix(wa: float, ma: np.ndarray, va: np.ndarray, wb: float, mb: np.ndarray,
             vb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tot = wa + wb
        with np.errstate(invalid="ignore", over="ignore"):
            mean = (wa * ma + wb * mb) / tot
            var = (wa * (va + (ma - mean) ** 2) + wb * (vb + (mb - mean) ** 2)) / tot
        return mean, var

    def update(self, rows: np.ndarray, policy: str) -> None:
        kept, skipped = kept_rows(rows, policy)
        self.n_skipped += skipped
        if len(kept) == 0:
            return  # a batch whose rows were all skipped is no step
        m = self.momentum
        with np.errstate(invalid="ignore", over="ignore"):
            bm, bv = kept.mean(0), kept.var(0)
        old = self.weight * (1 - m)
        self.mean, self.var = self._mix(old, self.mean, self.var, m, bm, bv)
        self.weight = old + m
        self.count += len(kept)

    def merge(self, other: EMARef) -> None:
        a, b = float(self.count), float(other.count)
        if a + b > 0:
            self.mean, self.var = self._mix(a, self.mean, self.var, b, other.mean, other.var)
            self.weight = (a * self.weight + b * other.weight) / (a + b)
        self.count += other.count
        self.n_skipped += other.n_skipped

    def expected(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "var": self.var, "weight": np.array(self.weight)}


@dataclass
class MinMaxRef:
    n_features: int
    lo: np.ndarray = None  # type: ignore[assignment]
    hi: np.ndarray = None  # type: ignore[assignment]
    count: int = 0
    n_skipped: int = 0

    def __post_init__(self) -> None:
        self.lo = np.full(self.n_features, math.inf)
        self.hi = np.full(self.n_features, -math.inf)

    def update(self, rows: np.ndarray, policy: str) -> None:
        kept, skipped = kept_rows(rows, policy)
        self.n_skipped += skipped
        self.count += len(kept)
        if len(kept):
            # np.minimum/maximum propagate NaN, as "propagate" must.
            self.lo = np.minimum(self.lo, kept.min(0))
            self.hi = np.maximum(self.hi, kept.max(0))

    def merge(self, other: MinMaxRef) -> None:
        self.lo = np.minimum(self.lo, other.lo)
        self.hi = np.maximum(self.hi, other.hi)
        self.count += other.count
        self.n_skipped += other.n_skipped

    def expected(self) -> dict[str, np.ndarray]:
        return {"min": self.lo, "max": self.hi}


Ref = MomentsRef | EMARef | MinMaxRef


def reference_for(stat: nn.Module) -> Ref:
    m = stat.moments if isinstance(stat, RunningNorm) else stat
    n = m.n_features
    if isinstance(m, EMAMoments):
        return EMARef(n, m.momentum)
    if isinstance(m, RunningMinMax):
        return MinMaxRef(n)
    return MomentsRef(n)


def persistent(stat: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent raw buffers, read through ``named_buffers()`` (no property involved)."""
    keys = set(stat.state_dict())
    return {n: b for n, b in stat.named_buffers() if n in keys}


def same_bits(a: nn.Module, b: nn.Module) -> bool:
    """Every persistent buffer bit-identical (NaN payloads included)."""
    pa, pb = persistent(a), persistent(b)
    if pa.keys() != pb.keys():
        return False
    for k, x in pa.items():
        y = pb[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.is_floating_point():
            ints = torch.int64 if x.dtype == torch.float64 else torch.int32
            x, y = x.view(ints), y.view(ints)
        if not torch.equal(x, y):
            return False
    return True


def tolerance(acc: torch.dtype, float32_input: bool = True) -> tuple[float, float]:
    """(rtol of means, rtol of spreads). float32 accumulators round every update; a float64
    accumulator fed float32 batches holds batch moments of float32 kernel precision (the batch
    is reduced in its own dtype, as BatchNorm does), with no drift from accumulating them."""
    if acc == torch.float32:
        return 2e-6, 2e-4
    return (1e-6, 1e-5) if float32_input else (1e-12, 1e-9)


def _close(name: str, got: torch.Tensor, want: np.ndarray, rtol: float, atol: Any = 0.0) -> None:
    """``|got - want| <= rtol * |want| + atol``; non-finite where (and only where) ``want`` is."""
    g = got.detach().to(torch.float64).reshape(-1).numpy()
    w = np.asarray(want, dtype=np.float64).reshape(-1)
    bad_ref = ~np.isfinite(w)
    # Where the reference is not finite (a propagated NaN/Inf) the stat must not be finite either.
    assert not np.isfinite(g[bad_ref]).any(), (name, g, w)
    ok = ~bad_ref
    err = np.abs(g[ok] - w[ok])
    bound = rtol * np.abs(w[ok]) + np.broadcast_to(atol, w.shape)[ok] + 1e-300
    assert (err <= bound).all(), (name, g, w, float(np.max(err / bound, initial=0.0)))


def check(
    stat: nn.Module, ref: Ref, acc: torch.dtype, frozen: bool | None = None,
    float32_input: bool = True,
) -> None:
    """Read-outs and raw persistent buffers of ``stat`` against ``ref``."""
    m = stat.moments if isinstance(stat, RunningNorm) else stat
    raw = persistent(m)
    assert raw["count"].dtype == torch.int64 and int(raw["count"]) == ref.count
    assert int(m.count) == ref.count
    assert int(raw["n_skipped"]) == ref.n_skipped
    if frozen is not None:
        assert bool(raw["frozen_flag"]) == frozen == m.frozen
    for k, v in raw.items():
        if v.is_floating_point():
            assert v.dtype == acc, (k, v.dtype)
    rtol_mean, rtol_spread = tolerance(acc, float32_input)
    exp = ref.expected()
    if isinstance(ref, MinMaxRef):
        for k in ("min", "max"):
            # Exact: extremes are input values, stored in the accumulator dtype.
            want = torch.from_numpy(exp[k]).to(acc).double().numpy()
            _close(k, raw[k], want, 0.0, np.zeros(1))
            _close(k, getattr(m, k), want, 0.0, np.zeros(1))
        return
    with np.errstate(invalid="ignore", over="ignore"):
        spread = np.sqrt(np.abs(exp["var"]))
        size = np.abs(exp["mean"]) + np.where(np.isfinite(spread), spread, 0.0)
    size = np.where(np.isfinite(size), size, 0.0)
    # A mean is good to rtol_mean of the data's size; a variance to rtol_spread of itself plus
    # the square of the mean's error (a constant column's variance is 0 only to rounding).
    mean_atol, var_atol = rtol_mean * size, (rtol_mean * size) ** 2
    _close("mean", raw["mean"], exp["mean"], rtol_mean, mean_atol)
    _close("mean", m.mean, exp["mean"], rtol_mean, mean_atol)
    _close("var", m.var, exp["var"], rtol_spread, var_atol)
    if isinstance(ref, EMARef):
        _close("var", raw["var"], exp["var"], rtol_spread, var_atol)
        _close("weight", raw["weight"], exp["weight"], rtol_mean)
    else:
        n = max(ref.count, 1)
        _close("m2", raw["m2"], exp["m2"], rtol_spread, var_atol * n)
        _close("std", m.std, np.sqrt(exp["var"]), rtol_spread, rtol_mean * size)
        if ref.count > 1:
            d = ref.data()
            with np.errstate(invalid="ignore", over="ignore"):
                _close("sample_var", m.sample_var, d.var(0, ddof=1), rtol_spread, var_atol * 2)
