"""Exact running mean and variance: :class:`RunningMoments` and :class:`EMAMoments`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from statplug._compat import is_functorch_wrapped
from statplug.stats.base import NanPolicy, Stat, StatBatch, real_number
from statplug.stats.merge import Moments, batch_moments, chan_merge, positive

__all__ = ["EMAMoments", "RunningMoments"]

_F64 = torch.float64


class RunningMoments(Stat):
    r"""Exact running mean and variance over every sample seen (Welford/Chan merging).

    State (``state_dict`` keys): ``count`` (int64), ``mean`` and ``m2`` (sum of squared
    deviations) in ``accumulator_dtype``, plus ``n_skipped`` and ``frozen_flag``. These buffers
    are current after every call, like ``nn.BatchNorm``'s running statistics.

    Each update takes the batch's column moments in one pass (torch's fused batch-norm
    statistics kernel on the CPU) and merges them into ``count``/``mean``/``m2`` with Chan's
    formula (:func:`statplug.stats.merge.chan_merge`), with no host read except the raise
    policy's on the CPU.

    Args:
        shape: feature shape (int or tuple). Leading dims of an update are samples.
        accumulator_dtype: dtype of the saved state and read-outs. Default: ``torch.float64``
            (a float32 mean fed one sample at a time stops moving after ~1e7 samples).
        nan_policy: ``"raise"``, ``"skip"`` or ``"propagate"``. Default: ``"raise"``.
        weighted: accept per-row ``weight`` in :meth:`update` and keep their total in a
            ``weight_sum`` buffer (float64, shape ``(1,)``) beside the row ``count``; the moments
            are then the weighted mean and weighted population variance. Default: False (the
            state and checkpoints of an unweighted stat have no such buffer).
        device: where to create the buffers. Default: the default device.

    Shape:
        - update input: :math:`(*, \text{shape})`
        - ``mean``, ``var``, ``std``: ``shape``; ``count``: ``()``

    Example:
        >>> import torch
        >>> from statplug import RunningMoments
        >>> m = RunningMoments(2)
        >>> m.update(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> m.update(torch.tensor([[5.0, 50.0]]))
        >>> m.count.item(), m.mean.tolist(), [round(v, 4) for v in m.var.tolist()]
        (3, [3.0, 30.0], [2.6667, 266.6667])
    """

    _version = 1
    mean: Tensor
    m2: Tensor
    weight_sum: Tensor

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        accumulator_dtype: torch.dtype = torch.float64,
        nan_policy: NanPolicy = "raise",
        weighted: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            shape, accumulator_dtype=accumulator_dtype, nan_policy=nan_policy, device=device
        )
        zeros = torch.zeros(self.shape, dtype=accumulator_dtype, device="cpu")
        self.add_state("mean", zeros, reduce="moments", agreed=True)
        self.add_state("m2", zeros.clone(), reduce="moments", agreed=True)
        self.weighted = bool(weighted)
        if self.weighted:  # (1,)-shaped: torch.compile loses updates of 0-dim float64 buffers
            total = torch.zeros(1, dtype=torch.float64, device="cpu")
            self.add_state("weight_sum", total, reduce="sum", agreed=True)

    # ------------------------------------------------------------------ read-outs
    @property
    def var(self) -> Tensor:
        """Population variance (ddof=0; weighted: ``m2`` over the total weight); 0 before the
        first sample."""
        if self.weighted:
            return self.m2 / positive(self.weight_sum.reshape(()))
        return self.m2 / self.count.clamp(min=1)

    @property
    def sample_var(self) -> Tensor:
        """Sample variance (ddof=1; weighted: frequency weights, ``m2 / (weight_sum - 1)``); 0
        before the second sample."""
        return self.m2 / (self._n() - 1).clamp(min=1)

    @property
    def std(self) -> Tensor:
        """Population standard deviation."""
        return self.var.sqrt()

    # ------------------------------------------------------------------ update and merge
    def update(
        self, x: Tensor, mask: Tensor | None = None, weight: Tensor | None = None
    ) -> None:
        if weight is not None and not self.weighted:
            raise ValueError(
                f"{self.stat_name}.update: `weight` needs a weighted stat, built with "
                f"{type(self).__name__}(..., weighted=True) (it keeps the total weight in "
                "`weight_sum`); got weights for an unweighted one"
            )
        super().update(x, mask, weight)

    update.__doc__ = Stat.update.__doc__

    def _absorb(self, rows: Tensor, weight: Tensor | None, n_rows: Tensor | int) -> None:
        batch = batch_moments(rows, self.accumulator_dtype, weight)
        keep = self._nan_check(batch.finite)
        if keep is not None:  # a batch the raise policy leaves out on the device: no data
            n = torch.where(keep, torch.as_tensor(batch.n), 0.0)
            batch = Moments(n, torch.where(keep, batch.mean, 0.0), torch.where(keep, batch.m2, 0.0))
            n_rows = torch.where(keep, n_rows, 0)
        self._merge_moments(batch, n_rows)

    def _n(self) -> Tensor:
        """The samples behind the moments: ``count``, or ``weight_sum`` when weighted."""
        return self.state("weight_sum" if self.weighted else "count")

    def _merge_moments(self, b: Moments, n_rows: Tensor | int) -> None:
        """Chan's merge of the batch moments ``b`` (of ``n_rows`` rows) into the state."""
        n, mean, m2 = self._n(), self.flat("mean"), self.flat("m2")
        # On the CPU both counts are host numbers: fewer tensor calls (a batch counted on the
        # host has a host count; the state's may still be a vmap wrapper).
        host = isinstance(b.n, float) and not is_functorch_wrapped(n)
        n_a = float(n) if host else n.to(self.accumulator_dtype)
        # On the host the merge writes the buffers itself; elsewhere (vmap takes no `out=`)
        # its result is copied in.
        merged = chan_merge(n_a, mean, m2, b.n, b.mean, b.m2, out=(mean, m2) if host else None)
        if not host:
            mean.copy_(merged.mean)
            m2.copy_(merged.m2)
        if self.weighted:
            self.state("weight_sum").add_(b.n)
        self.state("count").add_(n_rows)

    def _merge_from(self, other: Any) -> None:
        if other.weighted != self.weighted:
            raise ValueError(
                f"{self.stat_name}.merge_: both stats must be weighted or both unweighted, got "
                f"weighted={self.weighted} and weighted={other.weighted}"
            )
        n = other._n().to(self.accumulator_dtype)
        self._merge_moments(Moments(n, other.mean.reshape(-1), other.m2.reshape(-1)), 0)

    # ------------------------------------------------------------------ sync hooks
    sync_elements = ("mean",)

    @classmethod
    def sync_new_data(cls, batch: StatBatch) -> Moments:
        # The data since the agreed state (n_a, K, m2_a): Chan's merge solved for its second
        # part. mean_b - K = (mean - K) n / n_b, and m2 = m2_a + m2_b + (mean - K)**2 n n_a / n_b.
        counts = "weight_sum" if getattr(batch.stats[0], "weighted", False) else "count"
        n, n_a = batch.read(counts), batch.agreed(counts)  # one per stat
        n_b = n - n_a
        ratio = torch.where(n_b > 0, n / n_b, 0.0)  # no new data: nothing to solve for
        dk = batch.read("mean") - batch.agreed("mean")
        m2_b = batch.read("m2") - batch.agreed("m2")
        m2_b.addcmul_(dk, dk * batch.per_element(n_a * ratio, "mean"), value=-1.0)
        return Moments(n_b, dk * batch.per_element(ratio, "mean"), m2_b.clamp_(min=0))

    @classmethod
    def sync_absorb(cls, batch: StatBatch, new: Moments) -> None:
        # Chan's merge about the agreed mean K: the agreed state sits at 0, the new data at
        # new.mean (its mean - K).
        counts = "weight_sum" if getattr(batch.stats[0], "weighted", False) else "count"
        n_a = batch.per_element(batch.agreed(counts), "mean")
        n_b = batch.per_element(torch.as_tensor(new.n), "mean")
        zero = new.mean.new_zeros(())
        merged = chan_merge(n_a, zero, batch.agreed("m2"), n_b, new.mean, new.m2)
        batch.write("mean", batch.agreed("mean") + merged.mean)
        batch.write("m2", merged.m2)

    # ------------------------------------------------------------------ checks
    def _migrate(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        # An unweighted state loaded into a weighted stat: every row had weight 1.
        count = state_dict.get(prefix + "count")
        if self.weighted and prefix + "weight_sum" not in state_dict and isinstance(count, Tensor):
            state_dict[prefix + "weight_sum"] = count.to(torch.float64).reshape(1)

    def _value_problem(self, prefix: str, values: dict[str, Tensor]) -> str | None:
        problem = super()._value_problem(prefix, values)
        if problem is not None:
            return problem
        if self.weighted and not bool((values["weight_sum"] >= 0).all()):  # NaN too
            return f"{prefix + 'weight_sum'!r} must be >= 0, got {values['weight_sum'].tolist()}"
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


class EMAMoments(Stat):
    r"""Bias-corrected exponential moving mean and variance of batches.

    Each :meth:`update` is one step: with momentum ``m`` the weights of past batches decay by
    ``1 - m`` per step. State is normalised by the running weight ``weight = 1 - (1 - m)**t``,
    so the read-outs are bias corrected from the first step (no warm-up towards zero). The
    variance is the exponentially weighted variance of the samples (within-batch spread plus the
    spread of batch means).

    A sync merges the ranks' summaries weighted by the samples each saw since the last sync
    (Chan's merge of their weights, means and variances).

    State: ``count`` (int64, samples seen), ``weight`` (shape ``(1,)``), ``mean``, ``var`` in
    ``accumulator_dtype``.

    Args:
        shape: feature shape.
        momentum: weight of the newest batch, in (0, 1]. Default: 0.01.
        accumulator_dtype: Default: ``torch.float32``.
        nan_policy: Default: ``"raise"``.
        device: where to create the buffers. Default: the default device.

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

    # Version 2: `weight` has shape (1,) (0-dim float64 buffers lose in-place updates under
    # torch.compile in torch 2.13).
    _version = 2
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
        zeros = torch.zeros(self.shape, dtype=accumulator_dtype, device="cpu")
        self.add_state("weight", zeros.new_zeros(1), reduce="moments", agreed=True)
        self.add_state("mean", zeros, reduce="moments", agreed=True)
        self.add_state("var", zeros.clone(), reduce="moments")

    @property
    def std(self) -> Tensor:
        """Exponentially weighted standard deviation."""
        return self.var.clamp(min=0).sqrt()

    def _absorb(self, rows: Tensor, weight: Tensor | None, n_rows: Tensor | int) -> None:
        """One EMA step with the batch."""
        b = batch_moments(rows, self.accumulator_dtype, weight)
        keep = self._nan_check(b.finite)
        acc = self.accumulator_dtype
        n = torch.as_tensor(b.n, dtype=acc, device=b.mean.device)
        # A batch left out, or whose rows were all masked or skipped, is no step at all.
        step = n > 0 if keep is None else keep & (n > 0)
        m = self.momentum
        new_weight = torch.where(step, self.weight * (1.0 - m) + m, self.weight)
        r = torch.where(step, m / new_weight.clamp(min=1e-30), 0.0)
        mean, var = self.mean.view(-1), self.var.view(-1)
        mb = torch.where(step, b.mean.to(acc), mean)  # a left-out batch may hold NaN
        vb = torch.where(step, b.m2.to(acc) / positive(n), var)
        delta = mb - mean
        new_mean = mean + delta * r
        var.copy_(torch.lerp(var, vb + delta * (mb - new_mean), r))
        mean.copy_(new_mean)
        self.weight.copy_(new_weight)
        self.count.add_(torch.where(step, n_rows, 0))

    def _migrate(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        # Version 1 saved `weight` 0-dim.
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, Tensor) and weight.dim() == 0:
            state_dict[prefix + "weight"] = weight.reshape(1)

    def _value_problem(self, prefix: str, values: dict[str, Tensor]) -> str | None:
        problem = super()._value_problem(prefix, values)
        if problem is not None:
            return problem
        weight, var = values["weight"].double(), values["var"].double()
        if not bool(((weight >= 0) & (weight <= 1)).all()):  # NaN too
            return f"{prefix + 'weight'!r} must be in [0, 1], got {weight.tolist()!r}"
        if bool((var < 0).any()):
            return f"{prefix + 'var'!r} must be >= 0, got {var.min().item()!r}"
        if int(values["count"]) == 0 and bool(weight.any() or values["mean"].any() or var.any()):
            return (
                f"an empty state (count 0) must have zero {prefix + 'weight'!r}, "
                f"{prefix + 'mean'!r} and {prefix + 'var'!r}"
            )
        return None

    def _summary(self, n: Tensor) -> Moments:
        """The stat as ``n`` samples of mean ``[weight, *mean]`` and squared deviations
        ``[0, *var * n]`` (float64): how it merges, with the weight as one more feature."""
        n = n.to(_F64)
        mean = torch.cat([self.weight.to(_F64), self.mean.reshape(-1).to(_F64)])
        m2 = torch.cat([torch.zeros_like(n).reshape(1), self.var.reshape(-1).to(_F64) * n])
        return Moments(n, mean, m2)

    def _set_summary(self, merged: Moments) -> None:
        """Hold the merged summary (left unchanged where it holds no sample)."""
        n = torch.as_tensor(merged.n, dtype=_F64)
        ok = n > 0
        acc = self.accumulator_dtype
        var = merged.m2[1:] / positive(n)
        self.weight.copy_(torch.where(ok, merged.mean[:1].to(acc), self.weight))
        self.mean.view(-1).copy_(torch.where(ok, merged.mean[1:].to(acc), self.mean.view(-1)))
        self.var.view(-1).copy_(torch.where(ok, var.to(acc), self.var.view(-1)))

    def _merge_from(self, other: Any) -> None:
        # Count-weighted: the EMA summaries of two disjoint streams, weighted by their samples.
        a, b = self._summary(self.count), other._summary(other.count)
        self._set_summary(chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2))

    # ------------------------------------------------------------------ sync hooks
    # Each rank's summary counts with the samples it saw since the last sync; the weights
    # travel as one more element per stat, before the features.
    sync_elements = ("weight", "mean")

    @classmethod
    def sync_new_data(cls, batch: StatBatch) -> Moments:
        n_b = batch.read("count") - batch.agreed("count")
        mean = torch.cat([
            batch.read("weight") - batch.agreed("weight"),
            batch.read("mean") - batch.agreed("mean"),
        ])
        m2 = torch.cat([torch.zeros_like(n_b), batch.read("var") * batch.per_element(n_b, "mean")])
        return Moments(n_b, mean, m2)

    @classmethod
    def sync_absorb(cls, batch: StatBatch, new: Moments) -> None:
        k = len(batch.stats)
        n = batch.per_element(torch.as_tensor(new.n), *cls.sync_elements)
        ok = n > 0  # elements of stats no rank added to keep their value
        weight = batch.agreed("weight") + new.mean[:k]
        batch.write("weight", torch.where(ok[:k], weight, batch.read("weight")))
        mean = batch.agreed("mean") + new.mean[k:]
        batch.write("mean", torch.where(ok[k:], mean, batch.read("mean")))
        var = new.m2[k:] / positive(n[k:])
        batch.write("var", torch.where(ok[k:], var, batch.read("var")))
