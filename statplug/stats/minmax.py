"""Running per-feature minimum and maximum: :class:`RunningMinMax`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from statplug.stats.base import NanPolicy, Stat

__all__ = ["RunningMinMax"]

# Narrower batches are reduced as interleaved row groups of this width (measurements:
# docs/design-notes.md, "Column min/max").
_WIDE_ENOUGH = 64
_ROW_DTYPES = (torch.float32, torch.float64)


def _column_min_max(x: Tensor) -> tuple[Tensor, Tensor]:
    n, f = x.shape
    if f >= _WIDE_ENOUGH // 2:
        return x.amin(0), x.amax(0)
    g = 1
    while g * f < _WIDE_ENOUGH and n % (2 * g) == 0:
        g *= 2
    if g == 1 or not x.is_contiguous():
        lo, hi = torch.aminmax(x, dim=0)
        return lo, hi
    y = x.view(n // g, g * f)
    return y.amin(0).view(g, f).amin(0), y.amax(0).view(g, f).amax(0)


class RunningMinMax(Stat):
    r"""Running per-feature minimum and maximum, exact and merged with MIN/MAX reductions.

    State: ``count`` (int64), ``min`` and ``max`` in ``accumulator_dtype`` (``+inf`` / ``-inf``
    before the first sample).

    Args:
        shape: feature shape.
        accumulator_dtype: Default: ``torch.float32``.
        nan_policy: ``"raise"``, ``"skip"`` or ``"propagate"`` (a NaN then sticks). Default:
            ``"raise"``.

    Example:
        >>> import torch
        >>> from statplug import RunningMinMax
        >>> mm = RunningMinMax(2)
        >>> mm.update(torch.tensor([[1.0, -2.0], [3.0, 5.0]]))
        >>> mm.min.tolist(), mm.max.tolist()
        ([1.0, -2.0], [3.0, 5.0])
    """

    _version = 1
    _summary_features = ("min", "max")
    min: Tensor
    max: Tensor

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        accumulator_dtype: torch.dtype = torch.float32,
        nan_policy: NanPolicy = "raise",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            shape, accumulator_dtype=accumulator_dtype, nan_policy=nan_policy, device=device
        )
        acc = accumulator_dtype
        self.add_state("min", torch.full(self.shape, math.inf, dtype=acc), reduce="min")
        self.add_state("max", torch.full(self.shape, -math.inf, dtype=acc), reduce="max")

    def update(self, x: Tensor) -> None:
        """Add the samples in ``x`` (shape ``[..., *shape]``) to the extremes.

        One pass over ``x`` (a column minimum and maximum) and two small in-place ops. Never
        builds a graph; never reads a tensor on the host except with ``nan_policy="raise"``.
        """
        self._check_pinned_dtypes()  # a wrapper's `buffer.data` cast: raise before any change
        if self._plain_rows(x, _ROW_DTYPES):  # the common case (a hook on activations)
            self._update(x, self.nan_policy == "raise")
        else:
            Stat.update(self, x)

    def _fold(self, lo: Tensor, hi: Tensor) -> None:
        flat_min, flat_max = self.min.view(-1), self.max.view(-1)
        torch.minimum(flat_min, lo, out=flat_min)
        torch.maximum(flat_max, hi, out=flat_max)

    def _update(self, x: Tensor, check: bool) -> None:
        lo, hi = _column_min_max(x)
        if check:
            # NaN unless every extreme is finite (inf * 0 and NaN * 0 are NaN; a huge finite
            # range is no reason to raise).
            self._check_finite(torch.cat([lo, hi]).mul_(0).sum())
        self._fold(lo, hi)
        self.count.add_(x.shape[0])

    def _update_skip(self, x: Tensor) -> None:
        ok = torch.isfinite(x).all(dim=1, keepdim=True)
        n_ok = ok.sum()
        lo = torch.where(ok, x, math.inf).amin(0)
        hi = torch.where(ok, x, -math.inf).amax(0)
        self._fold(lo, hi)
        self.count.add_(n_ok)
        self.n_skipped.add_(x.shape[0] - n_ok)

    def _value_problem(self, prefix: str, values: dict[str, Tensor]) -> str | None:
        problem = super()._value_problem(prefix, values)
        if problem is not None:
            return problem
        lo, hi = values["min"].double(), values["max"].double()
        if int(values["count"]) == 0:
            if not bool((lo == math.inf).all() and (hi == -math.inf).all()):
                return (
                    f"an empty state (count 0) must have {prefix + 'min'!r} +inf and "
                    f"{prefix + 'max'!r} -inf"
                )
        elif bool((lo > hi).any()):  # NaN compares False: a propagated NaN is a valid state
            return f"{prefix + 'min'!r} must not exceed {prefix + 'max'!r}"
        return None

    def _merge_from(self, other: Any) -> None:
        self._fold(other.min.reshape(-1), other.max.reshape(-1))
