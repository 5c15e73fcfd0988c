"""Exact running mean and variance: :class:`RunningMoments` and :class:`EMAMoments`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from statplug.stats._kernels import GROUP_ROWS, batch_moments
from statplug.stats.base import NanPolicy, Stat, _host_count, real_number
from statplug.stats.syncing import Extrema, StateSums, SyncBatch, SyncPayload

__all__ = ["EMAMoments", "RunningMoments"]

_F64 = torch.float64
_F32_ONLY = (torch.float32,)


class _MomentsWork:
    """What :class:`RunningMoments`' sync hooks carry from one phase to the next (float64,
    element layout)."""

    __slots__ = ("k", "m2", "m2_base", "m2_new", "mean", "n", "n_base")

    def __init__(self, batch: SyncBatch) -> None:
        self.k = batch.gather("_base_mean").to(_F64)  # the agreed mean: the centre K
        self.n = batch.per_element(batch.stack("count").to(_F64))
        self.n_base = batch.per_element(batch.stack("_base_count").to(_F64))
        self.mean = batch.gather("mean").to(_F64)
        self.m2 = batch.gather("m2").to(_F64)
        self.m2_base = batch.gather("_base_m2").to(_F64)
        self.m2_new: Tensor | None = None  # M2 of the new data, when one phase sufficed

    def squares_around(self, c: Tensor) -> Tensor:
        """Sum over this rank's new samples of ``(x - c)**2``: everything seen, minus the
        agreed part, each about ``c`` -- no sum of squares far from the data."""
        return (self.m2 - self.m2_base) + self.n * (self.mean - c).square() - self.n_base * (
            self.k - c
        ).square()


class RunningMoments(Stat):
    r"""Exact running mean and variance over every sample seen (Welford/Chan merging).

    State (``state_dict`` keys): ``count`` (int64), ``mean`` and ``m2`` (sum of squared deviations)
    in ``accumulator_dtype``, plus ``n_skipped`` and ``frozen_flag``. These buffers are current
    after every call, like ``nn.BatchNorm``'s running statistics.

    Each update takes the batch's column means and variances from torch's fused batch-norm
    statistics kernel (by interleaved groups of rows for large batches, see
    ``statplug.stats._kernels``) and merges them into ``count``/``mean``/``m2`` with Chan's
    formula: one pass over the batch and a handful of ``shape``-sized ops, no device sync. The state
    agreed across ranks at the last sync or load is kept aside (non-persistent ``_base_*``
    buffers) so that a sync sends only what was added since and never double counts.

    Args:
        shape: feature shape (int or tuple). Leading dims of an update are samples.
        accumulator_dtype: dtype of the saved state and read-outs. Default: ``torch.float32``.
        nan_policy: ``"raise"``, ``"skip"`` or ``"propagate"``. Default: ``"raise"``.

    Shape:
        - update input: :math:`(*, \text{shape})`
        - ``mean``, ``var``, ``std``: ``shape``; ``count``: ``()``

    Example:
        >>> import torch
        >>> from statplug import RunningMoments
        >>> m = RunningMoments(2)
        >>> m.update(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> m.update(torch.tensor([[5.0, 50.0]]))
        >>> m.count.item(), m.mean.tolist(), m.var.tolist()
        (3, [3.0, 30.0], [2.6666667461395264, 266.6666564941406])
    """

    _version = 1
    mean: Tensor
    m2: Tensor
    _base_count: Tensor
    _base_mean: Tensor
    _base_m2: Tensor

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
        self.add_state("mean", torch.zeros(self.shape, dtype=acc), reduce="custom")
        self.add_state("m2", torch.zeros(self.shape, dtype=acc), reduce="custom")
        self._hidden("_base_mean", torch.zeros(self.shape, dtype=acc))
        self._hidden("_base_m2", torch.zeros(self.shape, dtype=acc))

    # ------------------------------------------------------------------ read-outs
    @property
    def var(self) -> Tensor:
        """Population variance (ddof=0); 0 before the first sample."""
        return self.m2 / self.count.clamp(min=1)

    @property
    def sample_var(self) -> Tensor:
        """Sample variance (ddof=1); 0 before the second sample."""
        return self.m2 / (self.count - 1).clamp(min=1)

    @property
    def std(self) -> Tensor:
        """Population standard deviation."""
        return self.var.sqrt()

    # ------------------------------------------------------------------ update
    def update(self, x: Tensor) -> None:
        """Add the samples in ``x`` (shape ``[..., *shape]``) to the statistic.

        One pass over ``x`` (torch's fused batch-norm statistics kernel) and a few small ops
        that merge it into the saved state (five on the CPU, where the count is read from
        memory; eight on accelerators and under ``torch.compile``, which never wait for the
        device). Never builds a graph; ``nan_policy="raise"`` reads the device once per update.
        """
        self._check_pinned_dtypes()  # a wrapper's `buffer.data` cast: raise before any change
        if self._plain_rows(x, _F32_ONLY):  # the common case, checked inline
            if x.shape[0] <= GROUP_ROWS:
                mb, vb = torch.batch_norm_update_stats(x, None, None, 0.0)
            else:
                mb, vb = batch_moments(x)
            if self.nan_policy == "raise":  # NaN/Inf raise; large offsets are refined
                mb, vb = self._checked_moments(x, mb, vb)
            self._merge_batch(mb, vb, x.shape[0])
        else:
            Stat.update(self, x)

    def _update(self, x: Tensor, check: bool) -> None:
        mb, vb = batch_moments(x)
        if check:  # one host read refuses NaN/Inf and refines large offsets
            mb, vb = self._checked_moments(x, mb, vb)
        self._merge_batch(mb, vb, x.shape[0])

    def _merge_batch(self, mb: Tensor, vb: Tensor, n: int) -> None:
        """Chan's merge of a batch of ``n`` samples with column means ``mb`` and population
        variances ``vb`` (flat) into ``count``/``mean``/``m2``, in place."""
        b = self._buffers
        count, mean, m2 = b["count"], b["mean"], b["m2"]
        if self._n_dims != 1:
            mean, m2 = mean.view(-1), m2.view(-1)  # type: ignore[union-attr]
        if _host_count(count):  # type: ignore[arg-type]
            # On the CPU the count is read from memory (no device to wait for), so the weights
            # are Python numbers and the merge is five ops.
            c = int(count)  # type: ignore[arg-type]
            total = c + n
            d = torch.sub(mb, mean)  # type: ignore[arg-type]
            mean.add_(d, alpha=n / total)  # type: ignore[union-attr]
            m2.addcmul_(d, d, value=n * c / total)  # type: ignore[union-attr]
            m2.add_(vb, alpha=n)  # type: ignore[union-attr]
            count.fill_(total)  # type: ignore[union-attr]
            return
        # On accelerators and under torch.compile the weights stay on the device: eight ops.
        count.add_(n)  # type: ignore[union-attr]
        # q = count / n, correctly rounded: exactly 1 for a first batch, whose mean is then
        # stored exactly and adds nothing but n * vb to m2.
        q = count.div(n) if self.accumulator_dtype is torch.float32 else count.to(_F64).div_(n)  # type: ignore[union-attr]
        d = mb - mean  # type: ignore[operator]
        step = d / q
        mean.add_(step)  # type: ignore[union-attr]
        # Chan: m2 += n * vb + n * (1 - n / count) * d**2, with d * (1 - n / count) = d - step.
        m2.addcmul_(d, d - step, value=n)  # type: ignore[union-attr]
        m2.add_(vb, alpha=n)  # type: ignore[union-attr]

    def _update_skip(self, x: Tensor) -> None:
        x = x.to(_F64)
        ok = torch.isfinite(x).all(dim=1, keepdim=True)
        n_ok = ok.sum()
        n1 = n_ok.clamp(min=1).to(_F64)
        xz = torch.where(ok, x, 0.0)
        mb = xz.sum(0) / n1
        m2b = ((xz - mb) * ok).square().sum(0)
        self._absorb(n_ok, mb, m2b)
        self.count.add_(n_ok)
        self.n_skipped.add_(x.shape[0] - n_ok)

    def _absorb(self, n_b: Tensor, mean_b: Tensor, m2_b: Tensor) -> None:
        """Chan's merge of ``n_b`` samples with mean ``mean_b`` and squared deviations ``m2_b``
        (flat) into ``mean``/``m2``, in float64; ``count`` is the caller's to add."""
        n_a = self.count.to(_F64)
        n_b = n_b.to(_F64)
        frac = n_b / (n_a + n_b).clamp(min=1)
        mean, m2 = self.mean.view(-1), self.m2.view(-1)
        d = mean_b.to(_F64) - mean
        new_m2 = m2 + m2_b + d.square() * (n_a * frac)
        mean.copy_(mean + d * frac)
        m2.copy_(new_m2)

    def _merge_from(self, other: Any) -> None:
        self._absorb(other.count, other.mean.reshape(-1), other.m2.reshape(-1))

    # ------------------------------------------------------------------ agreed state
    def agreed_names(self) -> list[str]:
        return [*super().agreed_names(), "_base_mean", "_base_m2"]

    def _settle_agreed(self) -> None:
        self._agree("_base_mean", "mean")
        self._agree("_base_m2", "m2")

    # ------------------------------------------------------------------ checks
    def _prospective_state(
        self, mean: Tensor, var: Tensor, n: int
    ) -> list[tuple[Tensor, Tensor]]:
        count = float(self.count)
        now_mean, now_m2 = self.mean.reshape(-1).to(_F64), self.m2.reshape(-1).to(_F64)
        d = mean.to(_F64) - now_mean
        total = count + n
        new_mean = now_mean + d * (n / total)
        new_m2 = now_m2 + var.to(_F64) * n + d.square() * (n * count / total)
        return [(new_mean, self.mean.reshape(-1)), (new_m2, self.m2.reshape(-1))]

    def _value_problem(self, prefix: str, values: dict[str, Tensor]) -> str | None:
        problem = super()._value_problem(prefix, values)
        if problem is not None:
            return problem
        m2 = values["m2"].double()
        if bool((m2 < 0).any()):
            return (
                f"{prefix + 'm2'!r} (sum of squared deviations) must be >= 0, got "
                f"{m2.min().item()!r}"
            )
        if int(values["count"]) == 0 and bool(values["mean"].any() or m2.any()):
            return (
                f"an empty state (count 0) must have zero {prefix + 'mean'!r} and "
                f"{prefix + 'm2'!r}"
            )
        return None

    # ------------------------------------------------------------------ sync hooks
    # Every rank's new data is summed around the agreed mean K, which all ranks share (checked
    # by a checksum sent with the layout fingerprint): n, sum(x - K) and S2 = sum((x - K)**2),
    # each taken from the running state minus the agreed state. Then the new data's
    # M2 = S2 - N (g - K)**2 (g: its global mean). That subtraction loses log2(S2 / M2) bits:
    # when M2 >= S2 / 2**10 for every element -- the usual case once a first sync has set K --
    # at most 10 of float64's 53, and the sync ends there. Otherwise (a first sync of data far
    # from 0, say) phase 2 sums the squared deviations around g itself: Chan's two-phase merge.
    _ONE_PHASE_RATIO = 2.0**-10

    @classmethod
    def sync_phase1(cls, batch: SyncBatch) -> tuple[StateSums, Extrema | None]:
        base, maxes = super().sync_phase1(batch)
        w = batch.work = _MomentsWork(batch)
        # Sum over the new data of (x - K) (the agreed part sums to 0), and of (x - K)**2.
        sums = MomentsSums(**base.fields_dict(), dev=w.n * (w.mean - w.k), sq=w.squares_around(w.k))
        return sums, maxes

    @classmethod
    def sync_phase2(cls, batch: SyncBatch, sums: StateSums) -> SyncPayload | None:
        assert isinstance(sums, MomentsSums)
        w: _MomentsWork = batch.work
        gk = sums.dev / batch.per_element(sums.count).clamp(min=1)  # g - K
        m2_new = torch.addcmul(sums.sq, gk, sums.dev, value=-1.0)
        if bool((m2_new >= sums.sq * cls._ONE_PHASE_RATIO).all()):  # False for NaN
            w.m2_new = m2_new
            return None
        w.m2_new = None
        return MomentsSquares(w.squares_around(w.k + gk))

    @classmethod
    def sync_apply(
        cls,
        batch: SyncBatch,
        sums: StateSums,
        maxes: Extrema | None,
        sums2: SyncPayload | None,
    ) -> None:
        # Chan's merge of the agreed state with the new global data.
        assert isinstance(sums, MomentsSums)
        w: _MomentsWork = batch.work
        batch.work = None
        if w.m2_new is not None:
            m2_new = w.m2_new
        else:
            assert isinstance(sums2, MomentsSquares)
            m2_new = sums2.sq
        n_new = batch.per_element(sums.count)
        total = (w.n_base + n_new).clamp(min=1)
        gk = sums.dev / n_new.clamp(min=1)
        mean = w.k + sums.dev / total
        m2 = w.m2_base + m2_new + gk.square() * (w.n_base * n_new / total)
        batch.scatter_agreed("mean", mean)  # the agreed state is the saved state, bit for bit
        batch.scatter_agreed("m2", m2)
        super().sync_apply(batch, sums, maxes, sums2)


@dataclasses.dataclass(eq=False)
class MomentsSums(StateSums):
    """:class:`RunningMoments`' first round: the base sums, then per element the sums over
    each rank's new data of ``x - K`` (``dev``) and ``(x - K)**2`` (``sq``), ``K`` the agreed
    mean."""

    dev: Tensor
    sq: Tensor


@dataclasses.dataclass(eq=False)
class MomentsSquares(SyncPayload):
    """:class:`RunningMoments`' second round: the sum of squared deviations around the new
    data's global mean."""

    sq: Tensor


class EMAMoments(Stat):
    r"""Bias-corrected exponential moving mean and variance of batches.

    Each :meth:`update` is one step: with momentum ``m`` the weights of past batches decay by
    ``1 - m`` per step. State is normalised by the running weight ``weight = 1 - (1 - m)**t``,
    so the read-outs are bias corrected from the first step (no warm-up towards zero). The
    variance is the exponentially weighted variance of the samples (within-batch spread plus the
    spread of batch means), merged exactly per step.

    State: ``count`` (int64, samples seen), ``weight``, ``mean``, ``var`` in ``accumulator_dtype``.

    Args:
        shape: feature shape.
        momentum: weight of the newest batch, in (0, 1]. Default: 0.01.
        accumulator_dtype: Default: ``torch.float32``.
        nan_policy: Default: ``"raise"``.

    Example:
        >>> import torch
        >>> from statplug import EMAMoments
        >>> ema = EMAMoments(1, momentum=0.5)
        >>> ema.update(torch.tensor([[2.0], [2.0]]))
        >>> ema.mean.item()
        2.0
        >>> ema.update(torch.tensor([[4.0], [4.0]]))
        >>> round(ema.mean.item(), 4)   # weights 0.25 and 0.5, normalised by 0.75
        3.3333
    """

    _version = 1
    _base_count: Tensor
    weight: Tensor
    mean: Tensor
    var: Tensor

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        momentum: float = 0.01,
        accumulator_dtype: torch.dtype = torch.float32,
        nan_policy: NanPolicy = "raise",
        device: torch.device | str | None = None,
    ) -> None:
        momentum = real_number(
            "EMAMoments", "momentum", momentum, low=0.0, high=1.0, low_open=True,
            expected="a number in (0, 1]",
        )
        super().__init__(
            shape, accumulator_dtype=accumulator_dtype, nan_policy=nan_policy, device=device
        )
        self.momentum = momentum
        acc = accumulator_dtype
        self.add_state("weight", torch.zeros((), dtype=acc), reduce="custom")
        self.add_state("mean", torch.zeros(self.shape, dtype=acc), reduce="custom")
        self.add_state("var", torch.zeros(self.shape, dtype=acc), reduce="custom")

    @property
    def std(self) -> Tensor:
        """Exponentially weighted standard deviation."""
        return self.var.clamp(min=0).sqrt()

    def _step(self, mb: Tensor, vb: Tensor, n: Tensor | int) -> None:
        """One EMA step with batch mean ``mb`` and population variance ``vb`` (flat)."""
        m = self.momentum
        mean = self.mean.view(-1)
        var = self.var.view(-1)
        self.weight.mul_(1.0 - m).add_(m)
        r = m / self.weight
        delta = mb - mean
        mean.addcmul_(delta, r)
        var.lerp_(vb + delta * (mb - mean), r)
        self.count.add_(n)

    def _update(self, x: Tensor, check: bool) -> None:
        mb, vb = batch_moments(x)
        if check:
            mb, vb = self._checked_moments(x, mb, vb)
        acc = self.accumulator_dtype
        self._step(mb.to(acc), vb.to(acc), x.shape[0])

    def _update_skip(self, x: Tensor) -> None:
        x = x.to(_F64)
        ok = torch.isfinite(x).all(dim=1, keepdim=True)
        n_ok = ok.sum()
        n1 = n_ok.clamp(min=1)
        xz = torch.where(ok, x, 0.0)
        mb = xz.sum(0) / n1
        vb = (((xz - mb) * ok) ** 2).sum(0) / n1
        self.n_skipped.add_(x.shape[0] - n_ok)
        # A batch whose rows were all skipped is no step at all.
        any_ok = n_ok > 0
        acc = self.accumulator_dtype
        before = (self.weight.clone(), self.mean.clone(), self.var.clone())
        self._step(mb.to(acc), vb.to(acc), n_ok)
        for buf, old in zip((self.weight, self.mean, self.var), before, strict=True):
            buf.copy_(torch.where(any_ok, buf, old))

    def _prospective_state(
        self, mean: Tensor, var: Tensor, n: int
    ) -> list[tuple[Tensor, Tensor]]:
        # The step of `_step` in float64, with each value it writes or forms in the accumulator.
        now_mean, now_var = self.mean.reshape(-1).to(_F64), self.var.reshape(-1).to(_F64)
        weight = float(self.weight) * (1.0 - self.momentum) + self.momentum
        r = self.momentum / weight
        mb = mean.to(_F64)
        delta = mb - now_mean
        new_mean = now_mean + delta * r
        target = var.to(_F64) + delta * (mb - new_mean)
        new_var = now_var + (target - now_var) * r
        return [
            (mb, now_mean), (delta, now_mean), (new_mean, now_mean),
            (target, now_var), (new_var, now_var),
        ]

    def _value_problem(self, prefix: str, values: dict[str, Tensor]) -> str | None:
        problem = super()._value_problem(prefix, values)
        if problem is not None:
            return problem
        weight, var = values["weight"].double(), values["var"].double()
        if not bool((weight >= 0) & (weight <= 1)):  # NaN too
            return f"{prefix + 'weight'!r} must be in [0, 1], got {weight.item()!r}"
        if bool((var < 0).any()):
            return f"{prefix + 'var'!r} must be >= 0, got {var.min().item()!r}"
        if int(values["count"]) == 0 and bool(weight != 0 or values["mean"].any() or var.any()):
            return (
                f"an empty state (count 0) must have zero {prefix + 'weight'!r}, "
                f"{prefix + 'mean'!r} and {prefix + 'var'!r}"
            )
        return None

    def _merge_from(self, other: Any) -> None:
        # Count-weighted: the EMA summaries of two disjoint streams, weighted by their samples.
        n_s = self.count.to(_F64)  # counts are added after this
        n_o = other.count.to(_F64)
        self._weighted_merge(n_s, n_o, other.weight, other.mean, other.var)

    def _weighted_merge(
        self, w_s: Tensor, w_o: Tensor, weight_o: Tensor, mean_o: Tensor, var_o: Tensor
    ) -> None:
        tot = (w_s + w_o).clamp(min=1e-300)
        a, b = w_s / tot, w_o / tot
        acc = self.accumulator_dtype
        mean = a * self.mean.to(_F64) + b * mean_o.to(_F64)
        var = a * (self.var.to(_F64) + (self.mean.to(_F64) - mean) ** 2) + b * (
            var_o.to(_F64) + (mean_o.to(_F64) - mean) ** 2
        )
        self.weight.copy_((a * self.weight.to(_F64) + b * weight_o.to(_F64)).to(acc))
        self.mean.copy_(mean.to(acc))
        self.var.copy_(var.to(acc))

    @classmethod
    def sync_phase1(cls, batch: SyncBatch) -> tuple[StateSums, Extrema | None]:
        base, maxes = super().sync_phase1(batch)
        # Weight of each rank's summary: its samples since the last sync (ties: equal weights).
        w = base.count + 1e-9
        sums = EMASums(
            **base.fields_dict(),
            weight_total=w,
            weight_sum=w * batch.stack("weight").to(_F64),
            mean_sum=batch.per_element(w) * batch.gather("mean").to(_F64),
        )
        return sums, maxes

    @classmethod
    def sync_phase2(cls, batch: SyncBatch, sums: StateSums) -> SyncPayload | None:
        assert isinstance(sums, EMASums)
        w_el = batch.per_element(batch.added("count") + 1e-9)  # as in phase 1, per rank
        g = sums.mean_sum / batch.per_element(sums.weight_total)
        mean = batch.gather("mean").to(_F64)
        return EMAVarSum(w_el * (batch.gather("var").to(_F64) + (mean - g) ** 2))

    @classmethod
    def sync_apply(
        cls,
        batch: SyncBatch,
        sums: StateSums,
        maxes: Extrema | None,
        sums2: SyncPayload | None,
    ) -> None:
        assert isinstance(sums, EMASums) and isinstance(sums2, EMAVarSum)
        w_el = batch.per_element(sums.weight_total)
        batch.scatter("weight", sums.weight_sum / sums.weight_total)
        batch.scatter("mean", sums.mean_sum / w_el)
        batch.scatter("var", sums2.var_sum / w_el)
        super().sync_apply(batch, sums, maxes, sums2)


@dataclasses.dataclass(eq=False)
class EMASums(StateSums):
    """:class:`EMAMoments`' first round: the base sums, each rank's weight (its samples since
    the last sync), and the weighted sums of its ``weight`` and ``mean``."""

    weight_total: Tensor
    weight_sum: Tensor
    mean_sum: Tensor


@dataclasses.dataclass(eq=False)
class EMAVarSum(SyncPayload):
    """:class:`EMAMoments`' second round: the weighted sum of each rank's variance around the
    global mean."""

    var_sum: Tensor
