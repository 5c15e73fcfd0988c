"""Per-batch moment kernels shared by the moment stats.

torch's fused batch-norm statistics kernel (``torch.batch_norm_update_stats``) is the speed
floor: one call returns each column's mean and population variance, ~40x faster than
``torch.var_mean`` on CPU. On its own it loses accuracy when a column's mean is large against its
spread: the float32 column sum drifts by about ``eps * |mean| * sqrt(rows)`` and the variance
comes out too large by that drift squared (mean 1e4, std 1, 65536 rows: 5e-3 relative). Viewing
the ``[N, F]`` batch as ``[N / g, g * F]`` makes the kernel reduce ``g`` interleaved groups of at
most 1024 rows per feature in the same single pass over memory (measured no slower); the groups
are then combined exactly in float64. No extra pass, no data-dependent branch, no host sync.
Rows left over by the split form one more group; wide batches are split at least down to
``MAX_ROWS`` rows per group, at some cost in speed.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "GROUP_ROWS",
    "batch_moments",
    "exact_moments",
    "grouped_moments",
    "moments_ok",
    "rows_per_group",
]

# Rows per group: at most this many rows are summed per feature in float32. Measured with mean 1e4
# and std 1 (float32): 65536 rows in one group give 5e-3 relative variance error, 2048 rows 1e-4.
GROUP_ROWS = 1024
# The kernel slows down ~2x once it reduces more than this many columns at once (measured on CPU),
# so the split prefers to stop there -- unless groups would still hold more than MAX_ROWS rows
# (GROUP_ROWS for batches too wide to split at all within MAX_COLUMNS), where exactness wins over
# speed.
MAX_COLUMNS = 2048
MAX_ROWS = 2048


def n_groups(n_rows: int, n_features: int) -> int:
    """How many interleaved groups an ``[n_rows, n_features]`` batch is split into.

    Pure arithmetic on the shape (no cache): under ``torch.compile`` it runs at trace time only.
    """
    g = 1
    while n_rows // g > GROUP_ROWS and 2 * g * n_features <= MAX_COLUMNS:
        g *= 2
    limit = GROUP_ROWS if 2 * n_features > MAX_COLUMNS else MAX_ROWS
    while n_rows // g > limit:
        g *= 2
    return g


def grouped_moments(x: Tensor) -> list[tuple[Tensor, Tensor, int]]:
    """Column means and population variances of ``x`` (``[N, F]``, float) by groups of rows.

    Returns one or two parts ``(means [g, F], variances [g, F], rows_per_group)``: the groups of
    the largest multiple of ``g`` rows, then, when ``N`` is not a multiple of ``g``, the
    remaining rows (fewer than ``g``) as one more group.
    """
    n, f = x.shape
    g = n_groups(n, f)
    if g == 1:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return [(mean.view(1, f), var.view(1, f), n)]
    if not x.is_contiguous():
        x = x.contiguous()
    rows = n // g
    main = rows * g
    mean, var = torch.batch_norm_update_stats(x[:main].view(rows, g * f), None, None, 0.0)
    parts = [(mean.view(g, f), var.view(g, f), rows)]
    if main < n:
        t_mean, t_var = torch.batch_norm_update_stats(x[main:], None, None, 0.0)
        parts.append((t_mean.view(1, f), t_var.view(1, f), n - main))
    return parts


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean and population variance of ``x`` (``[N, F]``, float32 or float64).

    One kernel call for up to :data:`GROUP_ROWS` rows (results in ``x``'s dtype); larger batches
    reduce by groups and combine them: equal groups in four ``F``-sized ops (results in ``x``'s
    dtype), a batch with left-over rows exactly in float64 (a dozen ops).
    """
    parts = grouped_moments(x)
    if len(parts) == 1:
        group_means, group_vars, _ = parts[0]
        if group_means.shape[0] == 1:
            return group_means[0], group_vars[0]
        # Equal groups: the mean of the group means, and the mean over groups of the
        # within-group variance plus the squared distance of the group mean to the mean (in the
        # kernel's dtype: a few groups, each already rounded to it).
        mean = group_means.mean(0)
        d = group_means - mean
        return mean, torch.addcmul(group_vars, d, d).mean(0)
    n = x.shape[0]
    f64 = torch.float64
    means = [(m.to(f64), v.to(f64), r) for m, v, r in parts]
    mean = torch.stack([m.sum(0) * r for m, _, r in means]).sum(0) / n
    var = torch.stack([(v + (m - mean).square()).sum(0) * r for m, v, r in means]).sum(0) / n
    return mean, var


# The raise policy's refinement (see ``moments_ok``). A group of ``r`` float32 rows sums its
# columns with an error of about 0.35 * sqrt(r) ulps of the mean on typical data (measured:
# 11-17 ulps at 1024-2048 rows), up to r / 10 ulps when the data span only a few ulps (ratios of
# mean to std of 1e5 and more). The variance is taken around that mean, so it comes out too large
# by the mean's error squared. Budgeting sqrt(r) ulps -- about three times the typical error --
# against REFINE_TOLERANCE (DESIGN's 1e-3) of the variance, float32 batches of 1024 rows are
# recomputed once |mean| / std exceeds ~8300 (256 rows: ~16600), and the error left unrefined
# stays below ~3e-4 relative. A tighter budget (1e-4) recomputed every 256-row batch of mean 1e4
# and std 1 in float64: 33x the kernel instead of 3.5x, for an error of 2e-5 that needs no fix.
REFINE_TOLERANCE = 1e-3
# m2 = count * var must fit the accumulator: batches whose variance exceeds its largest value
# times this fraction (2**-40: about 10**12 samples of that variance) take the checked path.
HEADROOM = 2.0**-40


def rows_per_group(n_rows: int, n_features: int) -> int:
    """Rows each column sum of :func:`batch_moments` adds up, at most."""
    return max(1, n_rows // n_groups(n_rows, n_features))


@functools.lru_cache(maxsize=256)
def _score_constants(
    rows: int, input_dtype: torch.dtype, acc_dtype: torch.dtype, var_dtype: torch.dtype
) -> tuple[float, float]:
    """(k, big) of :func:`moments_ok` (``torch.finfo`` costs a microsecond a call)."""
    eps = torch.finfo(input_dtype).eps
    big = min(torch.finfo(acc_dtype).max, torch.finfo(var_dtype).max) * HEADROOM
    return rows * eps * eps / REFINE_TOLERANCE, big


def moments_ok(
    mean: Tensor, var: Tensor, rows: int, input_dtype: torch.dtype, acc_dtype: torch.dtype
) -> bool | None:
    """True when :func:`batch_moments`' ``mean``/``var`` can be kept, False when they must be
    recomputed exactly, None when some column is not finite (the batch held a NaN or Inf, or
    its sums overflowed). ``t`` is negative when the column's result may be off by more than
    :data:`REFINE_TOLERANCE` relative (``k`` is that budget for ``rows`` rows of
    ``input_dtype``).

    Kept when every column's score ``t = var - k * mean**2`` lies in ``[0, big]`` (``big``: the
    :data:`HEADROOM` of the accumulator): one op, one ``aminmax`` and one host read on ordinary
    data. The rare batches outside are decided per column: exactly constant columns (variance
    0) have nothing to refine. The upper bound holds ``var <= big`` except for columns whose
    ``k * mean**2`` itself exceeds ``big`` (means beyond ~1e17 in float32), where the margin
    left is ~2**-28 of the accumulator instead of 2**-40.
    """
    k, big = _score_constants(rows, input_dtype, acc_dtype, var.dtype)
    t = torch.addcmul(var, mean, mean, value=-k)
    lo, hi = torch.aminmax(t)
    low, high = float(lo), float(hi)
    if low >= 0.0 and high <= big:
        return True
    if math.isnan(low) or math.isnan(high):
        return None
    return bool((((t >= 0) | (var == 0)) & (var <= big)).all())


def exact_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean and population variance of a finite ``x`` in float64, around a pivot.

    The first row is subtracted in float64 (exact for float32 data), so the kernel sums
    deviations, not values: no loss to a large mean, no overflow of values near the float32
    maximum. Three passes; the ``raise`` policy's path for batches :func:`moments_ok` rejects.
    """
    x64 = x.to(torch.float64, copy=True)  # never the caller's tensor: it is shifted in place
    pivot = x64[0].clone()
    mean, var = batch_moments(x64.sub_(pivot))
    return mean.add_(pivot), var
