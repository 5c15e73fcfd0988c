"""The moments of a batch and Chan's merge: the two pure functions every moment stat uses.

:func:`chan_merge` is the one place Chan's formula is written: an update merges a batch into a
stat with it, :meth:`~statplug.Stat.merge_` merges two stats with it, and the sync merges the
ranks' new data into the agreed state with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from statplug._compat import is_functorch_wrapped

__all__ = [
    "GROUP_ROWS",
    "NO_SPREAD",
    "Moments",
    "batch_moments",
    "chan_merge",
    "host_reads_free",
    "positive",
]

# At most this many rows are summed per column in float32 by the CPU kernel: with mean 1e4 and
# std 1, 65536 rows in one sum give 5e-3 relative variance error, 1024 rows ~1e-4.
GROUP_ROWS = 1024
_F64 = torch.float64
_TINY = torch.finfo(_F64).tiny
# Batches of at most this many elements (one observation per step, vectorised environments)
# take plain two-pass ops on the CPU, which stay on one thread; larger ones the fused kernel.
SMALL_BATCH = 4096
# A batch takes a second pass when the kernel's float32 sums may be off by more than half this
# fraction of a column's variance (measurements: docs/design-notes.md).
REFINE_TOLERANCE = 1e-3
# The m2 of a single sample (0): a merge with it skips adding it. Never written.
NO_SPREAD = torch.zeros((), dtype=_F64, device="cpu")


@dataclass
class Moments:
    """``n`` samples (a count or a total weight: a tensor, or a Python number where the host
    knows it), their column ``mean`` and ``m2`` (sum of squared deviations from the mean)."""

    n: Tensor | float
    mean: Tensor
    m2: Tensor
    known_finite: bool = False  # already checked on the host (the CPU kernel path)

    def finite(self) -> Tensor | bool:
        """Whether every mean and m2 is finite: True when already known, else a 0-dim bool
        tensor decided on the device."""
        if self.known_finite:
            return True
        return torch.isfinite(self.mean).all() & torch.isfinite(self.m2).all()


def chan_merge(
    n_a: Tensor | float,
    mean_a: Tensor,
    m2_a: Tensor,
    n_b: Tensor | float,
    mean_b: Tensor,
    m2_b: Tensor,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> Moments:
    """Chan et al.'s exact merge of two sets of moments (``n``: floating tensors, 0-dim or per
    element, or Python numbers where the host knows them; ``m2_b`` may be :data:`NO_SPREAD`,
    the m2 of one sample).

    Either side may be empty (``n == 0``): the result is then the other side, bit for bit.
    With ``out=(mean, m2)`` the merged mean and m2 are written into those tensors (a stat's own
    buffers, usually ``mean_a`` and ``m2_a``: the merge then allocates no state-sized result).

    Example:
        >>> import torch
        >>> t = torch.tensor
        >>> m = chan_merge(t(2.0), t([2.0]), t([2.0]), t(1.0), t([5.0]), t([0.0]))
        >>> m.n.item(), m.mean.tolist(), m.m2.tolist()   # the moments of [1, 3, 5]
        (3.0, [3.0], [8.0])
    """
    n = n_a + n_b
    frac = n_b / (positive(n) if isinstance(n, Tensor) else max(n, _TINY))  # 0 if b is empty
    d = mean_b - mean_a
    mean_out, m2_out = (None, None) if out is None else out
    m2_ab = m2_a if m2_b is NO_SPREAD else m2_a + m2_b
    if isinstance(frac, Tensor):
        mean = torch.addcmul(mean_a, d, frac, out=mean_out)
        m2 = torch.addcmul(m2_ab, d, d * (n_a * frac), out=m2_out)  # d * 0 first: no inf * 0
    else:  # host numbers: the factors are computed on the host, fewer tensor calls
        mean = torch.add(mean_a, d, alpha=frac, out=mean_out)
        m2 = torch.addcmul(m2_ab, d, d, value=float(n_a) * frac, out=m2_out)  # (value * d) * d
    return Moments(n, mean, m2)


def batch_moments(x: Tensor, acc: torch.dtype, weight: Tensor | None = None) -> Moments:
    """The moments of the rows of ``x`` (``[n, F]``, float), in the accumulator dtype ``acc``
    (for float64 state, eager on the CPU, possibly in float32: the merge promotes).

    With ``weight`` (``[n]``, >= 0; rows of weight 0 may hold anything, NaN included) the
    weighted moments. Eager on the CPU (:func:`_host_moments`) a row is its own mean, small
    batches take float64 sums, larger ones torch's fused batch-norm statistics kernel.
    Elsewhere -- accelerators, ``torch.compile``, tracing -- one ``var_mean`` in ``acc``, which
    never overflows for float32 input and has a fake kernel for dynamic shapes. For float32
    state the moments are cast to it, so that what overflows there is found not finite.
    """
    if weight is not None:
        return _weighted(x, weight, acc)
    if not host_reads_free(x):
        # The row count as a tensor op on x, so that jit.trace does not bake it in.
        rows = torch.ones_like(x[:, 0], dtype=acc).sum()
        v, m = torch.var_mean(x.to(acc), dim=0, correction=0)
        return Moments(rows, m, v * rows)
    batch = _host_moments(x)
    if acc is not _F64:  # float32 state: what is finite in float64 may overflow there
        return Moments(batch.n, batch.mean.to(acc), batch.m2.to(acc))
    return batch


def _host_moments(x: Tensor) -> Moments:
    """:func:`batch_moments` eager on the CPU, in float64 or float32 (the kernel's mean).

    One row is its own mean, with no spread (one observation per step). Up to
    :data:`SMALL_BATCH` elements, float64 column sums of the input and one float64 pass of
    squared deviations: exact, and single-threaded (the kernel wakes the intra-op pool even for
    a few rows: 0.4 ms for 64x4 on a busy 2-core machine). Larger batches take torch's fused
    batch-norm statistics kernel (one pass; by groups of at most :data:`GROUP_ROWS` rows for
    float32), with one more pass about the kernel's own mean for a batch far from 0 against its
    spread, and a float64 recomputation about a pivot for one whose sums overflowed (values
    near the float32 maximum).
    """
    n = float(x.shape[0])
    if x.shape[0] == 1:
        row = x[0]
        # A finite sum means finite values; one that overflowed is checked element-wise.
        known = math.isfinite(float(row.sum())) or bool(row.isfinite().all())
        return Moments(1.0, row, NO_SPREAD, known_finite=known)
    if x.numel() <= SMALL_BATCH:
        mean = x.sum(0, dtype=_F64) / n
        d = x - mean  # float64
        m2 = (d * d).sum(0)
        # float32 (or narrower) values have finite float64 sums and squares: one sum and one
        # host number tell whether the batch held a NaN or Inf.
        known = x.dtype is not torch.float64 and math.isfinite(float(mean.sum()))
        return Moments(n, mean, m2, known_finite=known)
    mean, m2 = _cpu_stats(x)
    # The kernel's column sums carry ~0.35 sqrt(rows) ulps of the mean (measured); the
    # variance inherits that error squared. One host read (free on the CPU) keeps the result
    # when 0.5 sqrt(rows) ulps stay below REFINE_TOLERANCE of every column's variance.
    k = 0.25 * min(x.shape[0], GROUP_ROWS) * torch.finfo(x.dtype).eps ** 2 / REFINE_TOLERANCE
    score = torch.addcmul(m2, mean, mean, value=-k * n)  # n (var - k mean**2)
    lo, hi = torch.aminmax(score)
    if float(lo) >= 0 and float(hi) < math.inf:  # False for NaN: every column finite and exact
        return Moments(n, mean, m2, known_finite=True)
    # The rare path: decided per column (exactly constant columns need no second pass).
    if bool((score.isfinite() & ((score >= 0) | (m2 == 0))).all()):
        return Moments(n, mean, m2, known_finite=True)
    if not bool(torch.isfinite(x).all()):
        return Moments(n, mean, m2)  # NaN/Inf: the nan policy decides
    if bool(mean.isfinite().all()):
        # Data far from 0 against their spread: one more pass about the kernel's own mean (in
        # the input's dtype x - mean is exact for x within a factor 2 of it, Sterbenz).
        d_mean, m2 = _cpu_stats(x - mean.to(x.dtype))
        mean = mean.double() + d_mean.double()
    else:  # sums that overflowed (values near the float32 maximum): float64 about a pivot
        pivot = x[0].to(_F64)
        d_mean, m2 = _cpu_stats(x.to(_F64) - pivot)
        mean = d_mean + pivot
    return Moments(n, mean, m2)


def positive(n: Tensor) -> Tensor:
    """``n``, with 0 raised to the dtype's smallest normal number: ``x / positive(n)`` is 0,
    not NaN, for an empty side (counts and weights are never that small otherwise)."""
    return n.clamp(min=torch.finfo(n.dtype).tiny)


def host_reads_free(t: Tensor) -> bool:
    """Whether reading ``t`` on the host costs nothing: a plain CPU tensor (a memory read) in
    eager mode -- not under ``torch.compile``, ``torch.jit.trace`` (which would bake the value
    in) or functorch transforms. Elsewhere every decision stays on the device."""
    return (
        type(t) is Tensor
        and t.is_cpu
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not is_functorch_wrapped(t)
    )


def _cpu_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean (in ``x``'s dtype or float64) and float64 m2 by torch's fused kernel;
    float32 batches larger than :data:`GROUP_ROWS` are reduced as interleaved groups (one pass
    over memory), the groups combined in float64."""
    n, f = x.shape
    if n <= GROUP_ROWS or x.dtype is _F64:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return mean, var.to(_F64) * n
    g = 1
    while n // g > GROUP_ROWS:
        g *= 2
    rows = n // g
    main = rows * g
    mean, var = torch.batch_norm_update_stats(x[:main].reshape(rows, g * f), None, None, 0.0)
    means = mean.view(g, f)
    grand = means.mean(0, dtype=_F64)
    d = means - grand
    m2 = (var.view(g, f).sum(0, dtype=_F64) + (d * d).sum(0)) * rows
    if main == n:
        return grand, m2
    t_mean, t_m2 = _cpu_stats(x[main:])
    total = chan_merge(float(main), grand, m2, float(n - main), t_mean, t_m2)
    return total.mean, total.m2


def _weighted(x: Tensor, weight: Tensor, acc: torch.dtype) -> Moments:
    """Weighted moments in ``acc``; rows of weight 0 are zeroed first so a NaN there is no
    NaN here. Two passes (mean, then squared deviations): exact for data far from 0."""
    w = weight.to(acc)
    keep = (w > 0).unsqueeze(1)
    xz = torch.where(keep, x.to(acc), 0.0)
    n = w.sum()
    mean = (w @ xz) / positive(n)
    d = torch.where(keep, xz - mean, 0.0)
    return Moments(float(n) if host_reads_free(n) else n, mean, w @ (d * d))
