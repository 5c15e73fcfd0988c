"""Mergeable running quantiles in buffers: :class:`RunningQuantiles` and :class:`QuantileNorm`.

The sketch is DDSketch's (Masson, Rim and Lee, VLDB 2019): a histogram over logarithmically
spaced buckets whose bucket counts are int64 buffers. Counts merge by addition, so a merge, and a
sync across ranks, is an exact integer sum: the result is bit-identical whatever the number of
ranks and the order of merges, and the sync needs no code of its own (``reduce="sum"`` states
travel as what each rank added since the last sync).
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from statplug.stats.base import NanPolicy, Stat, real_number
from statplug.stats.holder import StatHolder
from statplug.stats.merge import host_reads_free
from statplug.stats.minmax import batch_extremes, extremes_problem

__all__ = ["QuantileNorm", "RunningQuantiles"]

_F64 = torch.float64
_FINITE_MAX = sys.float_info.max
# Bucket indices are computed in the input's float precision: float32 counts integers exactly
# up to 2**24, so the window stays well below that.
_MAX_BUCKETS = 1 << 20


class RunningQuantiles(Stat):
    r"""Per-feature quantiles of every sample seen, within a relative value error, mergeable
    exactly across ranks (a DDSketch held in int64 buffers).

    A value ``x != 0`` falls in bucket ``i = ceil(log(|x|) / log(gamma))`` of its sign, with
    ``gamma = (1 + a) / (1 - a)`` and ``a = relative_accuracy``; bucket ``i`` holds the magnitudes
    in ``(gamma**(i-1), gamma**i]`` and reads back as ``2 * gamma**i / (gamma + 1)``, which is
    within relative error ``a`` of every magnitude in it. Zeros have a bucket of their own.
    :meth:`quantile` finds the bucket holding the sample of rank ``ceil(q * count)`` (numpy's
    ``method="inverted_cdf"``) and returns its value, clamped into the exact ``[min, max]``, and
    the exact ``min`` and ``max`` at ``q = 0`` and ``q = 1``.

    **Memory is fixed**: each sign has ``max_buckets`` buckets, indices ``min_index ..
    min_index + max_buckets - 1`` with ``min_index = -(max_buckets // 2)``, a window centred on 1
    in log scale. It covers the magnitudes in :attr:`magnitude_range` -- about ``1.2e-9`` to
    ``7.7e8`` at the defaults (``a = 0.01``, 2048 buckets: 17.8 decades). Smaller magnitudes
    collapse into the lowest bucket of their sign and larger ones into the highest. A quantile
    whose exact value is zero or has a magnitude inside the window keeps the guarantee
    (relative value error at most ``relative_accuracy``, up to float rounding of the bucket
    index); one outside it is only clamped into ``[min, max]``. Widen the window with
    ``max_buckets`` (the span grows linearly with it) or trade accuracy for span. The state is
    ``counts`` (int64, shape ``[*shape, 2 * max_buckets + 1]``: negative buckets by decreasing
    magnitude, the zero bucket, positive buckets by increasing magnitude, so the last axis is
    ordered by value), ``min`` and ``max`` (``accumulator_dtype``), ``count``, ``n_skipped``,
    ``frozen_flag`` and ``accuracy`` (the relative accuracy, checked on load and merge).

    Args:
        shape: feature shape; every leading dim of an update is a sample dim.
        relative_accuracy: the relative value error ``a`` of every quantile inside the window,
            in (0, 1). Default: 0.01.
        max_buckets: buckets per sign and feature (the window's size), at most 2**20.
            Default: 2048.
        nan_policy: ``"raise"``, ``"skip"`` or ``"propagate"`` (quantiles then read NaN).
            Default: ``"raise"``.
        accumulator_dtype: dtype of ``min``, ``max`` and the read-outs. Default:
            ``torch.float64``.
        device: where to create the buffers. Default: the default device.

    Shape:
        - update input: :math:`(*, \text{shape})`
        - ``quantile(q)``: ``shape`` for a float ``q``, ``[len(q), *shape]`` for a 1-D tensor

    Example:
        >>> import torch
        >>> from statplug import RunningQuantiles
        >>> qs = RunningQuantiles(2)
        >>> qs.update(torch.arange(1.0, 1001.0).repeat(2, 1).T)   # 1, 2, ..., 1000 per feature
        >>> median = qs.quantile(0.5)
        >>> bool(((median - 500).abs() <= 0.01 * 500).all())     # within 1% of the exact median
        True
        >>> qs.quantile(torch.tensor([0.0, 1.0])).tolist()        # exact extremes
        [[1.0, 1.0], [1000.0, 1000.0]]
    """

    _version = 1
    _summary_features = ("min", "max", "q01", "q50", "q99")
    counts: Tensor
    min: Tensor
    max: Tensor
    accuracy: Tensor

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        relative_accuracy: float = 0.01,
        max_buckets: int = 2048,
        nan_policy: NanPolicy = "raise",
        accumulator_dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            shape, accumulator_dtype=accumulator_dtype, nan_policy=nan_policy, device=device
        )
        name = type(self).__name__
        self.relative_accuracy = real_number(
            name, "relative_accuracy", relative_accuracy, low=0.0, high=1.0, low_open=True,
            expected="a number in (0, 1)",
        )
        if self.relative_accuracy == 1.0:
            raise ValueError(f"{name}: `relative_accuracy` must be a number in (0, 1), got 1.0")
        if (
            isinstance(max_buckets, bool)
            or not isinstance(max_buckets, int)
            or not 1 <= max_buckets <= _MAX_BUCKETS
        ):
            raise ValueError(
                f"{name}: `max_buckets` must be an int in [1, {_MAX_BUCKETS}], got {max_buckets!r}"
            )
        self.max_buckets = max_buckets
        a = self.relative_accuracy
        self.gamma = (1.0 + a) / (1.0 - a)
        self._log_gamma = math.log(self.gamma)
        self.min_index = -(max_buckets // 2)
        self.n_slots = 2 * max_buckets + 1
        counts = torch.zeros((*self.shape, self.n_slots), dtype=torch.int64, device="cpu")
        self.add_state("counts", counts, reduce="sum", agreed=True)
        inf = torch.full(self.shape, math.inf, dtype=accumulator_dtype, device="cpu")
        self.add_state("min", inf, reduce="min")
        self.add_state("max", -inf, reduce="max")
        # Configuration saved with the state, so a load or merge of a sketch built with another
        # accuracy is refused instead of reading its buckets at the wrong scale.
        self.add_state("accuracy", torch.tensor(a, dtype=_F64, device="cpu"))

    # ------------------------------------------------------------------ read-outs
    @property
    def magnitude_range(self) -> tuple[float, float]:
        """``(low, high)``: the magnitudes the buckets resolve (``(low, high]``); others collapse
        into the end buckets of their sign."""
        lg = self._log_gamma
        top = (self.min_index + self.max_buckets - 1) * lg
        # A window wider than float64's range just reaches past it (its end buckets stay empty).
        return math.exp((self.min_index - 1) * lg), math.exp(top) if top < 709 else math.inf

    def _representatives(self, device: torch.device) -> Tensor:
        """Float64 ``[n_slots]``: the value each slot of ``counts`` reads back as."""
        b = self.max_buckets
        slot = torch.arange(self.n_slots, device=device, dtype=_F64)
        # Slot b + 1 + k holds positive bucket min_index + k; slot b - 1 - k the negative one.
        k = (slot - b).abs() - 1
        value = torch.exp((k + self.min_index) * self._log_gamma) * (2.0 / (self.gamma + 1.0))
        return torch.where(slot < b, -value, torch.where(slot > b, value, 0.0))

    def _probabilities(self, q: float | Tensor | Sequence[float]) -> tuple[Tensor, bool]:
        """``q`` as a float64 ``[Q]`` tensor on the stat's device, and whether it was a scalar."""
        owner = f"{self.stat_name}.quantile"
        if isinstance(q, Tensor):
            if q.dim() > 1 or q.is_complex() or q.dtype is torch.bool:
                raise ValueError(
                    f"{owner}: `q` must be a float or a 1-D tensor of probabilities, got a "
                    f"{q.dtype} tensor of shape {tuple(q.shape)}"
                )
            scalar = q.dim() == 0
            probs = q.detach().reshape(-1)
            # Checking values is a host read: done where it is free (not under compile).
            if host_reads_free(probs):
                if not bool(((probs >= 0) & (probs <= 1)).all()):
                    raise ValueError(f"{owner}: `q` must lie in [0, 1], got {q.tolist()}")
                if probs.dtype != _F64:
                    # torch.tensor([0.99]) is float32 0.99000001: its rank ceil(q * n) can be one
                    # past numpy's for 0.99. Read it as the short decimal it was typed as.
                    probs = torch.tensor([_typed_decimal(v) for v in probs.tolist()], dtype=_F64)
            return probs.to(self.counts.device, _F64), scalar
        if isinstance(q, Sequence) and not isinstance(q, (str, bytes)):
            values = [real_number(owner, "q", v, low=0.0, high=1.0, expected="in [0, 1]")
                      for v in q]
            return torch.tensor(values, dtype=_F64, device=self.counts.device), False
        value = real_number(owner, "q", q, low=0.0, high=1.0, expected="a probability in [0, 1]")
        return torch.tensor([value], dtype=_F64, device=self.counts.device), True

    def quantile(self, q: float | Tensor | Sequence[float]) -> Tensor:
        """The ``q``-quantile of every feature (numpy's ``method="inverted_cdf"``: the sample of
        rank ``ceil(q * count)``), within ``relative_accuracy`` of the exact value inside
        :attr:`magnitude_range`; exact ``min`` and ``max`` at 0 and 1; NaN before any sample.

        Args:
            q: a probability in [0, 1] (the result has the feature shape), or a 1-D tensor or
                sequence of them (the result is ``[len(q), *shape]``). Python floats and float64
                tensors give numpy's ranks exactly; a float32 tensor on the CPU is read as the
                short decimal it rounds from (float32 0.99 is 0.99000001, whose rank can be one
                more), elsewhere as it is.

        Returns:
            A tensor in ``accumulator_dtype`` on the stat's device (no host read).
        """
        probs, scalar = self._probabilities(q)
        counts = self.counts.view(self.n_features, self.n_slots)
        cum = counts.cumsum(1)
        n = self.count.to(_F64)
        # n * q in float64, as numpy computes it, so ranks agree with numpy's bit for bit.
        rank = torch.ceil(n * probs).clamp(min=1).to(torch.int64)
        where = torch.searchsorted(cum, rank.expand(self.n_features, -1).contiguous())
        where = where.clamp(max=self.n_slots - 1)  # an empty sketch finds no slot
        value = self._representatives(counts.device)[where]  # [F, Q]
        lo = self.min.reshape(-1, 1).to(_F64)
        hi = self.max.reshape(-1, 1).to(_F64)
        # The exact quantile lies in [min, max]: clamping only moves the estimate closer.
        value = torch.minimum(torch.maximum(value, lo), hi)
        value = torch.where(probs == 0, lo, torch.where(probs == 1, hi, value))
        value = torch.where(n > 0, value, math.nan).to(self.accumulator_dtype)
        out = value.T.reshape(-1, *self.shape)
        return out[0] if scalar else out

    @property
    def q01(self) -> Tensor:
        """The 1st percentile (:meth:`quantile` at 0.01)."""
        return self.quantile(0.01)

    @property
    def q50(self) -> Tensor:
        """The median (:meth:`quantile` at 0.5)."""
        return self.quantile(0.5)

    @property
    def q99(self) -> Tensor:
        """The 99th percentile (:meth:`quantile` at 0.99)."""
        return self.quantile(0.99)

    # ------------------------------------------------------------------ update and merge
    def _absorb(self, rows: Tensor, weight: Tensor | None, n_rows: Tensor | int) -> None:
        """Count the rows (those of positive weight: a sketch counts rows, it does not weigh
        them) into their buckets: a few elementwise passes (bucket index from ``log|x|``) and one
        ``scatter_add_`` into the flat bucket counts, with no loop over features."""
        lo, hi, keep = batch_extremes(self, rows, weight)
        src = (
            torch.ones((), dtype=torch.int64, device=rows.device).expand(rows.shape[0])
            if weight is None else (weight > 0).to(torch.int64)
        )
        if keep is not None:
            n_rows = torch.where(keep, n_rows, 0)
            src = src * keep
        slots = self._slots(rows)  # [F, N]
        counts = self.counts.view(self.n_features, self.n_slots)
        counts.scatter_add_(1, slots, src.expand(self.n_features, -1))
        flat_min, flat_max = self.min.view(-1), self.max.view(-1)
        torch.minimum(flat_min, lo.to(flat_min.dtype), out=flat_min)
        torch.maximum(flat_max, hi.to(flat_max.dtype), out=flat_max)
        self.count.add_(n_rows)

    def _slots(self, rows: Tensor) -> Tensor:
        """The slot of ``counts`` each value of ``rows`` (``[N, F]``) falls in, as int64
        ``[F, N]`` (a transposed view). NaN goes to the zero slot: only rows the nan policy
        leaves out (weight 0) or propagates (min and max read NaN) hold one."""
        b = self.max_buckets
        # k = ceil(log|x| / log(gamma)) - min_index, clamped into the window [0, b): one
        # in-place chain on one temporary. ceil(y + c) = ceil(y) + c for the integer c.
        t = rows.abs().log_()
        shift = torch.tensor(float(-self.min_index), dtype=t.dtype, device=t.device)
        torch.add(shift, t, alpha=1.0 / self._log_gamma, out=t)
        t.ceil_().clamp_(0, b - 1).add_(1)
        # Negative values count down from the zero slot b, positive ones up; sign(0) = 0.
        t.mul_(torch.sign(rows)).add_(b).nan_to_num_(nan=float(b))
        return t.to(torch.int64).T

    def _merge_from(self, other: Any) -> None:
        if (other.relative_accuracy, other.max_buckets) != (
            self.relative_accuracy, self.max_buckets
        ):
            raise ValueError(
                f"{self.stat_name}.merge_: expected a sketch with relative_accuracy="
                f"{self.relative_accuracy} and max_buckets={self.max_buckets}, got "
                f"relative_accuracy={other.relative_accuracy} and max_buckets={other.max_buckets}"
            )
        self.counts.add_(other.counts)
        flat_min, flat_max = self.min.view(-1), self.max.view(-1)
        torch.minimum(flat_min, other.min.reshape(-1), out=flat_min)
        torch.maximum(flat_max, other.max.reshape(-1), out=flat_max)

    @classmethod
    def _for_saved_state(cls, shape: tuple[int, ...], state: Mapping[str, Tensor]) -> Stat:
        # The saved bucket count and accuracy, so a summary reads any sketch's buckets.
        counts, accuracy = state.get("counts"), state.get("accuracy")
        if counts is None or accuracy is None or counts.dim() == 0 or counts.shape[-1] % 2 != 1:
            return cls(shape, accumulator_dtype=_F64)  # the load then names what is wrong
        return cls(
            shape, relative_accuracy=float(accuracy), max_buckets=counts.shape[-1] // 2,
            accumulator_dtype=_F64,
        )

    def reset_parameters(self) -> None:
        """Empty and unfreeze the sketch, and write its configuration back (the meta-device
        flow: ``to_empty()`` then this)."""
        self.accuracy.fill_(self.relative_accuracy)
        super().reset_parameters()

    # ------------------------------------------------------------------ checks
    def _value_problem(self, prefix: str, values: dict[str, Tensor]) -> str | None:
        problem = super()._value_problem(prefix, values)
        if problem is not None:
            return problem
        saved = float(values["accuracy"])
        if saved != self.relative_accuracy:
            return (
                f"{prefix + 'accuracy'!r}: the state was saved with relative_accuracy={saved!r}, "
                f"this sketch has {self.relative_accuracy!r}; build it with the saved accuracy"
            )
        counts = values["counts"]
        if bool((counts < 0).any()):
            return f"{prefix + 'counts'!r} must be non-negative bucket counts"
        count = int(values["count"])
        totals = counts.sum(-1)
        if not bool((totals == count).all()):
            return (
                f"{prefix + 'counts'!r} must add up to {prefix + 'count'!r} ({count}) in every "
                f"feature, got totals from {int(totals.min())} to {int(totals.max())}"
            )
        return extremes_problem(prefix, values)

    def extra_repr(self) -> str:
        return (
            f"relative_accuracy={self.relative_accuracy}, max_buckets={self.max_buckets}, "
            + super().extra_repr()
        )


def _typed_decimal(value: float) -> float:
    """The shortest decimal (at most 9 digits) that rounds to the float32 ``value``, else
    ``value``: 0.99000001 (float32 0.99) becomes 0.99."""
    for digits in range(1, 10):
        decimal = round(value, digits)
        if struct.unpack("f", struct.pack("f", decimal))[0] == value:
            return decimal
    return value


class QuantileNorm(StatHolder):
    r"""Normalise inputs by running quantiles: ``q_low -> -1`` and ``q_high -> 1``.

    ``y = 2 * (x - q_low) / (q_high - q_low) - 1`` per feature, then clipped to
    ``[-clip, clip]`` when ``clip`` is set (the robot-learning convention of normalising actions
    and states by their 1st and 99th percentiles). A feature whose two quantiles are equal maps
    to 0. In ``train()`` mode :meth:`forward` updates the sketch with ``x`` and then normalises;
    in ``eval()`` mode it only normalises. Before two samples have been seen it returns ``x``
    unchanged. The sketch is the submodule ``sketch`` (a :class:`RunningQuantiles`), so it is
    saved, moved, synced and audited like any stat.

    Args:
        shape: feature shape.
        low: the probability mapped to -1. Default: 0.01.
        high: the probability mapped to 1. Default: 0.99.
        clip: clip the output to ``[-clip, clip]``. Default: None (no clipping).
        relative_accuracy: of the sketch's quantiles. Default: 0.01.
        max_buckets: buckets per sign and feature of the sketch. Default: 2048.
        nan_policy: Default: ``"raise"``.
        accumulator_dtype: Default: ``torch.float64``.
        device: where to create the buffers. Default: the default device.

    Shape:
        - Input: :math:`(*, \text{shape})`; Output: same shape and dtype as the input.

    Example:
        >>> import torch
        >>> from statplug import QuantileNorm
        >>> norm = QuantileNorm(1, low=0.0, high=1.0)          # min -> -1, max -> 1
        >>> norm(torch.tensor([[2.0], [4.0], [6.0]])).flatten().tolist()
        [-1.0, 0.0, 1.0]
        >>> _ = norm.eval()
        >>> norm.inverse(torch.tensor([[0.5]])).item()
        5.0
    """

    _version = 1
    _held = "sketch"

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        low: float = 0.01,
        high: float = 0.99,
        clip: float | None = None,
        relative_accuracy: float = 0.01,
        max_buckets: int = 2048,
        nan_policy: NanPolicy = "raise",
        accumulator_dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.low = real_number(name, "low", low, low=0.0, high=1.0, expected="in [0, 1)")
        self.high = real_number(name, "high", high, low=0.0, high=1.0, expected="in (0, 1]")
        if not self.low < self.high:
            raise ValueError(
                f"{name}: `low` must be below `high`, got low={low!r} and high={high!r}"
            )
        self.clip = None if clip is None else real_number(
            name, "clip", clip, low=0.0, high=_FINITE_MAX, low_open=True,
            expected="a finite positive number or None",
        )
        self.sketch = RunningQuantiles(
            shape, relative_accuracy=relative_accuracy, max_buckets=max_buckets,
            nan_policy=nan_policy, accumulator_dtype=accumulator_dtype, device=device,
        )
        # Named after the normaliser in messages until a model walk gives it its qualified name.
        self.sketch.stat_name = f"{name}.sketch"

    def reset_parameters(self) -> None:
        """Empty and unfreeze the sketch (the meta-device flow)."""
        self.sketch.reset_parameters()

    def _affine(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool | Tensor]:
        """(centre, half-width) in ``dtype`` such that ``y = (x - centre) / half`` normalises,
        and whether two samples were seen (the identity before: centre 0, half-width 1)."""
        s = self.sketch
        s._check_pinned_dtypes()
        q = s.quantile(torch.tensor([self.low, self.high], dtype=_F64))
        q_low, q_high = q[0], q[1]
        centre = (q_low + q_high) / 2
        half = (q_high - q_low) / 2
        half = torch.where(half == 0, math.inf, half)  # equal quantiles: the feature maps to 0
        centre, half, ready = self._until_ready((centre, half), (0.0, 1.0))
        return centre.to(dtype), half.to(dtype), ready

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x``; in ``train()`` mode update the sketch with it first. Returns the
        input's dtype for floating inputs; integer inputs come back in the accumulator dtype."""
        s = self.sketch
        if self.training:
            s.update(x)
        work = x if x.is_floating_point() else x.to(s.accumulator_dtype)
        low = work.dtype in (torch.float16, torch.bfloat16)
        centre, half, ready = self._affine(torch.float32 if low else work.dtype)
        return self._clipped(((work - centre) / half).to(work.dtype), ready)

    def inverse(self, y: Tensor) -> Tensor:
        """Undo :meth:`forward` (up to clipping): ``x = (y + 1) / 2 * (q_high - q_low) +
        q_low``. A feature whose quantiles are equal comes back as that value."""
        acc = self.sketch.accumulator_dtype
        centre, half, _ = self._affine(acc)
        out = y.to(acc) * half.nan_to_num(posinf=0.0) + centre
        return out.to(y.dtype) if y.is_floating_point() else out

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}, clip={self.clip}"
