"""Exact running mean and variance: :class:`RunningMoments` and :class:`EMAMoments`."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from statplug.stats._kernels import GROUP_ROWS, grouped_moments
from statplug.stats.base import NanPolicy, Stat, SyncBatch

__all__ = ["EMAMoments", "RunningMoments"]

_F64 = torch.float64
_PENDING_N = operator.attrgetter("pending_n")
# Small batches are kept as per-batch (mean, variance) rows of a ring and folded into the float64
# sums when it is full: at most this many rows, and at most _RING_ELEMENTS floats per ring.
_RING_ROWS = 32
_RING_ELEMENTS = 1 << 16


class _HostState:
    """Mutable host-side state of a :class:`RunningMoments` (never tensor values)."""

    __slots__ = (
        "dirty",
        "legacy_pending_steps",
        "pending_n",
        "ring_rows",
        "ring_used",
        "shift_set",
        "slots",
        "slots_of",
    )

    def __init__(self) -> None:
        self.pending_n = 0  # samples in the local sums or the ring but not yet in `count`
        self.ring_used = 0  # ring rows holding a batch not yet folded into the local sums
        self.ring_rows = 0  # the batch size every one of those batches has
        self.shift_set = False  # is K chosen for the pending local data?
        self.dirty = False  # are the saved buffers behind the working state?
        # Per-row views of the ring buffers, and the buffers they view (rebuilt after `.to()`).
        self.slots: list[tuple[Tensor, Tensor]] = []
        self.slots_of: tuple[Tensor, Tensor] | None = None
        self.legacy_pending_steps = 0  # see RunningMoments.__setstate__

    def __getstate__(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in self.__slots__}
        state["slots"], state["slots_of"] = [], None  # views are rebuilt, never pickled
        state["legacy_pending_steps"] = 0
        return state

    def __setstate__(self, state: dict[str, Any] | tuple[Any, dict[str, Any]]) -> None:
        if isinstance(state, tuple):  # pickled before __getstate__ existed: (None, slots)
            state = state[1]
        self.__init__()  # type: ignore[misc]  # defaults for fields an older pickle lacks
        for k, v in state.items():
            if k in self.__slots__:
                setattr(self, k, v)
        self.legacy_pending_steps = int(state.get("pending_steps", 0))


class RunningMoments(Stat):
    r"""Exact running mean and variance over every sample seen (Welford/Chan merging).

    State (``state_dict`` keys): ``count`` (int64), ``mean`` and ``m2`` (sum of squared deviations)
    in ``accumulator_dtype``, plus ``n_skipped`` and ``frozen_flag``.

    How it stays exact and fast: each batch's column means and variances come from torch's fused
    batch-norm statistics kernel (by interleaved groups of rows, see ``statplug.stats._kernels``)
    and are folded into float64 sums of deviations from a shift ``K`` (the shifted-data algorithm),
    a handful of tiny ops per batch and no host sync. Reading ``mean``/``var`` or saving merges the
    pending sums into the saved buffers with Chan's formula and re-centres ``K``. Data already
    agreed across ranks (loaded, or synced) is held apart from data added since, so a sync
    contributes only the latter and never double counts.

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
    _base_count: Tensor
    _mean_base: Tensor
    _m2_base: Tensor
    _shift: Tensor
    _s1: Tensor
    _s2: Tensor
    _ring_mean: Tensor
    _ring_var: Tensor

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
        f = self.n_features
        # float64 working state. Base: what all ranks agree on (loaded or synced).
        self._hidden("_mean_base", torch.zeros(f, dtype=_F64))
        self._hidden("_m2_base", torch.zeros(f, dtype=_F64))
        # Local data since the last sync: sums of (x - K) and (x - K)**2 around the shift K.
        self._hidden("_shift", torch.zeros(f, dtype=_F64))
        self._hidden("_s1", torch.zeros(f, dtype=_F64))
        self._hidden("_s2", torch.zeros(f, dtype=_F64))
        # Update fast path for small batches: the batch-norm kernel writes each batch's column
        # means and (unbiased) variances straight into the next row of a ring, its only op; the
        # ring is folded into the float64 sums when full or read. Sample counts stay on the host
        # until then (the shapes tell them; no device op, no sync).
        self._add_ring(None)
        # Host-side bookkeeping in a plain object: nn.Module.__setattr__ costs ~1.5 us a call.
        self._host = _HostState()

    def _add_ring(self, device: torch.device | None) -> None:
        """Register the ring buffers (on ``device``, or the stat's device when None) and the row
        width of a ``[n, F]`` batch the update fast path takes (-1: none, for N-D features)."""
        f = self.n_features
        rows = max(2, min(_RING_ROWS, _RING_ELEMENTS // f))
        for name in ("_ring_mean", "_ring_var"):
            ring = torch.zeros(rows, f, dtype=torch.float32, device=device)
            self._hidden(name, ring)
        self._row_features = f if len(self.shape) == 1 else -1

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        buffers = self._buffers
        if "_ring_mean" not in buffers:
            # Pickled whole (torch.save(model)) by statplug before the small-batch ring: fold its
            # float32 pending sums (around the float32-exact shift) and drop their buffers.
            shift = cast(Tensor, buffers["_shift"])
            p1, p2 = buffers.pop("_p1", None), buffers.pop("_p2", None)
            buffers.pop("_shift32", None)
            if p1 is not None and p2 is not None and self._host.legacy_pending_steps:
                with torch.no_grad():
                    cast(Tensor, buffers["_s1"]).add_(p1)
                    cast(Tensor, buffers["_s2"]).add_(p2)
            self._host.legacy_pending_steps = 0
            self._add_ring(shift.device)

    # ------------------------------------------------------------------ read-outs
    @property  # type: ignore[override]
    def mean(self) -> Tensor:
        """Mean of every sample seen, shape ``shape``, in ``accumulator_dtype``."""
        self._materialize()
        return self._buffers["mean"]  # type: ignore[return-value]

    @property
    def m2(self) -> Tensor:
        """Sum of squared deviations from the mean (Welford's M2)."""
        self._materialize()
        return self._buffers["m2"]  # type: ignore[return-value]

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

        One pass over ``x`` (torch's fused batch-norm statistics kernel). A batch of up to 1024
        rows costs that kernel call alone: it writes the batch's column means and variances into
        a ring that is folded into the float64 sums every few dozen updates or when read. Larger
        batches add a few ops on ``shape``-sized tensors. Never builds a graph; never reads a
        tensor on the host except with ``nan_policy="raise"``, which looks once per update.
        """
        shape = x.shape if isinstance(x, Tensor) else None
        if (
            shape is not None
            and len(shape) == 2
            and 0 < shape[0] <= GROUP_ROWS
            and shape[1] == self._row_features
            and x.dtype is torch.float32
            and not self._frozen
            and self.nan_policy != "skip"
        ):
            # The common case, checked inline: Python overhead is a large part of its cost.
            x2 = x.detach() if x.requires_grad else x
        else:
            rows = self._fast_input(x)  # validates, views N-D input as rows, handles "skip"
            if rows is None:
                return
            x2 = rows
            if x2.shape[0] > GROUP_ROWS or x2.dtype is not torch.float32:
                if x2.dtype is not torch.float64:
                    x2 = x2.float()
                self._update(x2, self.nan_policy == "raise")
                return
        n = x2.shape[0]
        host = self._host
        used = host.ring_used
        if used and n != host.ring_rows:
            self._flush()  # the ring holds batches of one size only
            used = 0
        slots = host.slots
        if host.slots_of is None or host.slots_of[0] is not self._buffers["_ring_mean"]:
            slots = self._ring_slots()
        mean_row, var_row = slots[used]
        # momentum=1 makes the kernel write this batch's mean and unbiased variance into the
        # ring rows (a single sample has no variance; its row is left alone).
        _, vb = torch.batch_norm_update_stats(x2, mean_row, var_row if n > 1 else None, 1.0)
        # A NaN or Inf in a column makes its variance NaN. (vb . vb is the cheapest reduction.)
        if self.nan_policy == "raise" and math.isnan(float(vb.dot(vb))):
            mean_row.zero_()  # the kernel keeps NaN in a row it writes next time
            var_row.zero_()
            self._raise_non_finite()
        host.ring_rows = n
        host.ring_used = used + 1
        host.pending_n += n
        host.dirty = True
        if used + 1 == len(slots):
            self._flush()

    def _update(self, x: Tensor, check: bool) -> None:
        parts = grouped_moments(x)
        if check and any(math.isnan(float(v.sum())) for _, v, _ in parts):
            self._raise_non_finite()
        if not self._host.shift_set:
            self._set_shift(parts[0][0][0])
        b = self._buffers
        for means, variances, rows in parts:
            d = means.to(_F64) - b["_shift"]  # type: ignore[operator]
            if d.shape[0] == 1:
                d = d[0]
                b["_s1"].add_(d, alpha=rows)  # type: ignore[union-attr]
                b["_s2"].add_(variances[0], alpha=rows)  # type: ignore[union-attr]
                b["_s2"].addcmul_(d, d, value=rows)  # type: ignore[union-attr]
            else:
                b["_s1"].add_(d.sum(0), alpha=rows)  # type: ignore[union-attr]
                b["_s2"].add_(torch.addcmul(variances, d, d).sum(0), alpha=rows)  # type: ignore[union-attr]
        self._host.pending_n += x.shape[0]
        self._host.dirty = True

    def _ring_slots(self) -> list[tuple[Tensor, Tensor]]:
        """Per-row views of the ring buffers, made once per binding of the buffers."""
        host = self._host
        ring_mean, ring_var = self._buffers["_ring_mean"], self._buffers["_ring_var"]
        host.slots = list(zip(ring_mean.unbind(0), ring_var.unbind(0), strict=True))  # type: ignore[union-attr]
        host.slots_of = (ring_mean, ring_var)  # type: ignore[assignment]
        return host.slots

    def _set_shift(self, value: Tensor) -> None:
        """Choose the shift K for new local data."""
        self._shift.copy_(value.reshape(-1))
        self._host.shift_set = True

    def _flush(self) -> None:
        """Fold the ring of small batches and the host-side pending count into the buffers."""
        host = self._host
        used = host.ring_used
        if used:
            # Buffers never require grad: in-place updates record nothing, so no no_grad needed.
            b = cast(dict[str, Tensor], self._buffers)
            rows = host.ring_rows
            s1, s2 = b["_s1"], b["_s2"]
            if used == 1 and host.slots_of is not None and host.slots_of[0] is b["_ring_mean"]:
                # One batch (a read after every update, a sync right after one): 4-5 tiny ops.
                mean_row, var_row = host.slots[0]
                if not host.shift_set:
                    self._set_shift(mean_row)
                d = torch.sub(mean_row, b["_shift"])  # float64
                s1.add_(d, alpha=rows)
                s2.addcmul_(d, d, value=rows)
                if rows > 1:  # sum of squared deviations within the batch
                    s2.add_(var_row, alpha=rows - 1)
            else:
                means = b["_ring_mean"][:used]
                if not host.shift_set:
                    self._set_shift(means[0])
                d = torch.sub(means, b["_shift"])  # float64
                s1.add_(d.sum(0), alpha=rows)
                s2.add_(torch.linalg.vecdot(d, d, dim=0), alpha=rows)
                if rows > 1:  # sums of squared deviations within each batch
                    s2.add_(b["_ring_var"][:used].sum(0, dtype=_F64), alpha=rows - 1)
            host.ring_used = 0
        if host.pending_n:
            self._buffers["count"].add_(self._host.pending_n)  # type: ignore[union-attr]
            self._host.pending_n = 0

    def _clear_ring(self) -> None:
        """Drop unfolded ring rows and zero the ring (the kernel would carry a NaN row over)."""
        with torch.no_grad():
            self._ring_mean.zero_()
            self._ring_var.zero_()
        self._host.ring_used = 0

    def _update_skip(self, x: Tensor) -> None:
        self._flush()
        x = x.to(_F64)
        ok = torch.isfinite(x).all(dim=1, keepdim=True)
        n_ok = ok.sum()
        xz = torch.where(ok, x, 0.0)
        if not self._host.shift_set:
            self._set_shift(xz.sum(0) / n_ok.clamp(min=1))
        d = (xz - self._shift) * ok
        self._s1.add_(d.sum(0))
        self._s2.add_((d * d).sum(0))
        self.count.add_(n_ok)
        self.n_skipped.add_(x.shape[0] - n_ok)
        self._host.dirty = True

    # ------------------------------------------------------------------ merging
    def _local(self) -> tuple[Tensor, Tensor, Tensor]:
        """(n, mean, m2) of the local data since the last sync, float64 (after a flush)."""
        b = cast(dict[str, Tensor], self._buffers)
        s1, s2 = b["_s1"], b["_s2"]
        n = (b["count"] - b["_base_count"]).to(_F64)
        n1 = n.clamp(min=1)
        mean = b["_shift"] + s1 / n1
        m2 = (s2 - s1 * s1 / n1).clamp(min=0)
        return n, mean, m2

    @staticmethod
    def _squares_around(s1: Tensor, s2: Tensor, n: Tensor, d: Tensor) -> Tensor:
        """Sum of squared deviations from ``K - d`` of the samples whose sums around ``K`` are
        ``s1`` and ``s2`` (``n`` samples): ``s2 + 2 d s1 + n d**2 = s2 + 2 d (s1 + n d / 2)``."""
        return torch.addcmul(s2, d, torch.addcmul(s1, n, d, value=0.5), value=2.0)

    @staticmethod
    def _chan(
        na: Tensor, ma: Tensor, m2a: Tensor, nb: Tensor, mb: Tensor, m2b: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Chan et al.'s exact merge of two (count, mean, M2) summaries."""
        n = (na + nb).clamp(min=1)
        delta = mb - ma
        frac = nb / n
        return ma + delta * frac, m2a + m2b + delta * delta * (na * frac)

    def _total(self, local: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(mean, m2) over base and local data (``local``: a precomputed :meth:`_local`)."""
        n_l, mean_l, m2_l = local if local is not None else self._local()
        b = self._buffers
        n_b = b["_base_count"].to(_F64)  # type: ignore[union-attr]
        return self._chan(n_b, b["_mean_base"], b["_m2_base"], n_l, mean_l, m2_l)  # type: ignore[arg-type]

    def _materialize(self) -> None:
        self._flush()
        if not self._host.dirty:
            return
        b = self._buffers
        with torch.no_grad():
            local = self._local()
            n_l, mean_l, m2_l = local
            mean, m2 = self._total(local)
            # Re-centre the local sums near their own mean (exact algebra) so K follows the data.
            shift = b["_shift"]
            shift.copy_(mean_l)  # type: ignore[union-attr]
            d = mean_l - shift  # type: ignore[operator]
            b["_s1"].copy_(n_l * d)  # type: ignore[union-attr]
            b["_s2"].copy_(m2_l + n_l * d * d)  # type: ignore[union-attr]
            b["mean"].copy_(mean.view(self.shape))  # type: ignore[union-attr]
            b["m2"].copy_(m2.view(self.shape))  # type: ignore[union-attr]
        self._host.dirty = False

    def _merge_from(self, other: Any) -> None:
        self._flush()
        mean_o, m2_o = other._total()
        n_o = other.count.to(_F64)
        if not self._host.shift_set:
            self._set_shift(mean_o)
        d = mean_o - self._shift
        self._s1.add_(n_o * d)
        self._s2.add_(m2_o + n_o * d * d)
        self._host.dirty = True

    def _reset_hidden(self) -> None:
        for buf in (self._mean_base, self._m2_base, self._shift, self._s1, self._s2):
            buf.zero_()
        self._clear_ring()
        self._host.pending_n = 0
        self._host.shift_set = False
        self._host.dirty = False

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self._materialize()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def settle_(self) -> RunningMoments:
        self._materialize()  # the saved buffers, exactly as state_dict() would write them
        super().settle_()
        return self

    def _rebase_after_load(self) -> None:
        with torch.no_grad():
            self._mean_base.copy_(self._buffers["mean"].reshape(-1))  # type: ignore[union-attr]
            self._m2_base.copy_(self._buffers["m2"].reshape(-1))  # type: ignore[union-attr]
            self._s1.zero_()
            self._s2.zero_()
            # A sync multiplies the shift by the local count even when that is 0: a shift left
            # non-finite by earlier data (or uninitialised after `to_empty`) would give NaN.
            self._shift.zero_()
        self._clear_ring()
        self._host.pending_n = 0
        self._host.shift_set = False
        self._host.dirty = False

    # ------------------------------------------------------------------ sync hooks
    # Sync: the new data of every rank is summed around a centre K that all ranks share -- the
    # agreed base mean (equal on every rank after a load or sync; a checksum of it is compared
    # with the layout fingerprint), or 0 when
    # the checksums differ. Phase 1 carries n, sum(x - K) and S2 = sum((x - K)**2), and
    # M2 = S2 - N (g - K)**2 (g: the global mean of the new data). That subtraction loses
    # log2(S2 / M2) bits: when M2 >= S2 / 2**10 for every element -- the usual case once a first
    # sync has set the base -- at most 10 of float64's 53 (relative error < 3e-13), and the sync
    # ends there. Otherwise (a first sync of data far from 0, say: mean 1e4 and std 1 would lose
    # 27 bits) phase 2 sums the squared deviations around g itself: Chan's two-phase merge.
    _ONE_PHASE_RATIO = 2.0**-10

    @classmethod
    def _sync_checksum(cls, batch: SyncBatch) -> Tensor | None:
        return batch.checksum("_mean_base")

    @classmethod
    def _sync_phase1(cls, batch: SyncBatch) -> tuple[list[Tensor], list[Tensor]]:
        hosts = batch.cache.get("hosts")
        if hosts is None:
            hosts = batch.cache["hosts"] = [s._host for s in batch.stats]  # type: ignore[union-attr]
        if any(map(_PENDING_N, hosts)):  # C-level check of every stat, then flush the few
            for stat in batch.stats:
                if stat._host.pending_n:  # type: ignore[union-attr]
                    stat._flush()
        sums, maxes = super()._sync_phase1(batch)
        n_l = batch.per_element(sums[0])  # local samples since the last sync, per element
        batch.scratch["n_l"] = n_l
        s1, s2, shift = batch.gather("_s1"), batch.gather("_s2"), batch.gather("_shift")
        # Local sums are around the local shift; re-centred on K (exact algebra):
        d = shift - batch.gather("_mean_base") if batch.agreed else shift
        sums.append(torch.addcmul(s1, n_l, d))  # sum of (x - K)
        sums.append(cls._squares_around(s1, s2, n_l, d))  # sum of (x - K)**2
        return sums, maxes

    @classmethod
    def _sync_phase2(cls, batch: SyncBatch, sums1: list[Tensor]) -> list[Tensor]:
        sum_dev, s2k = sums1[2], sums1[3]
        gk = sum_dev / batch.per_element(sums1[0]).clamp(min=1)  # g - K; g: new data's mean
        batch.scratch["gk"] = gk
        # M2 = S2 - N (g - K)**2 = S2 - (g - K) * sum(x - K), exact enough if >= S2 / 2**10.
        m2_new = torch.addcmul(s2k, gk, sum_dev, value=-1.0)
        if bool((m2_new >= s2k * cls._ONE_PHASE_RATIO).all()):  # False for NaN: phase 2 decides
            batch.scratch["m2_new"] = m2_new
            return []
        batch.scratch.pop("m2_new", None)  # never a leftover of an interrupted sync
        g = batch.gather("_mean_base") + gk if batch.agreed else gk
        k = batch.gather("_shift") - g
        # Sum over local samples of (x - g)**2 from the sums around the local shift.
        return [
            cls._squares_around(batch.gather("_s1"), batch.gather("_s2"), batch.scratch["n_l"], k)
        ]

    @classmethod
    def _sync_apply(
        cls, batch: SyncBatch, sums1: list[Tensor], maxes: list[Tensor], sums2: list[Tensor]
    ) -> None:
        # Chan's merge of the agreed base with the new global data, in place on the arenas.
        scratch = batch.scratch
        m2_new = scratch["m2_new"] if "m2_new" in scratch else sums2[0]
        n_b = batch.stack("_base_count").to(_F64)
        n_new = sums1[0]
        frac = n_new / (n_b + n_new).clamp(min=1)
        mean_b, m2_b = batch.gather("_mean_base"), batch.gather("_m2_base")
        delta = scratch["gk"] if batch.agreed else scratch["gk"] - mean_b  # g - base mean
        m2_b.add_(torch.addcmul(m2_new, delta, delta * batch.per_element(n_b * frac)))
        mean_b.addcmul_(delta, batch.per_element(frac))
        scratch.clear()
        super()._sync_apply(batch, sums1, maxes, sums2)
        batch.zero("_s1")
        batch.zero("_s2")
        # The saved buffers, now that the local part is empty (so reads need no merge).
        batch.scatter("mean", mean_b)
        batch.scatter("m2", m2_b)


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
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"EMAMoments: `momentum` must be in (0, 1], got {momentum!r}")
        super().__init__(
            shape, accumulator_dtype=accumulator_dtype, nan_policy=nan_policy, device=device
        )
        self.momentum = float(momentum)
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
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        parts = grouped_moments(x)
        if check and any(math.isnan(float(v.sum())) for _, v, _ in parts):
            self._raise_non_finite()
        acc = self.accumulator_dtype
        if len(parts) == 1 and parts[0][0].shape[0] == 1:
            mb, vb = parts[0][0][0].to(acc), parts[0][1][0].to(acc)
        else:
            # Combine the groups exactly (float64): weighted mean, then spread around it.
            n = x.shape[0]
            m64 = [(r, m.to(_F64), v.to(_F64)) for m, v, r in parts]
            mb64 = torch.stack([r * m.sum(0) for r, m, _ in m64]).sum(0) / n
            vb64 = torch.stack([r * (v + (m - mb64).square()).sum(0) for r, m, v in m64]).sum(0) / n
            mb, vb = mb64.to(acc), vb64.to(acc)
        self._step(mb, vb, x.shape[0])

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

    def _merge_from(self, other: Any) -> None:
        # Count-weighted: the EMA summaries of two disjoint streams, weighted by their samples.
        n_s = (self.count - other.count).to(_F64)  # count already includes other's
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
    def _sync_phase1(cls, batch: SyncBatch) -> tuple[list[Tensor], list[Tensor]]:
        sums, maxes = super()._sync_phase1(batch)
        # Weight of each rank's summary: its samples since the last sync (ties: equal weights).
        w = sums[0] + 1e-9
        sums += [
            w,
            w * batch.stack("weight").to(_F64),
            batch.per_element(w) * batch.gather("mean").to(_F64),
        ]
        return sums, maxes

    @classmethod
    def _sync_phase2(cls, batch: SyncBatch, sums1: list[Tensor]) -> list[Tensor]:
        w = batch.stack("count") - batch.stack("_base_count")
        w_el = batch.per_element(w.to(_F64) + 1e-9)
        g = sums1[4] / batch.per_element(sums1[2])
        mean = batch.gather("mean").to(_F64)
        return [w_el * (batch.gather("var").to(_F64) + (mean - g) ** 2)]

    @classmethod
    def _sync_apply(
        cls, batch: SyncBatch, sums1: list[Tensor], maxes: list[Tensor], sums2: list[Tensor]
    ) -> None:
        w_total = sums1[2]
        w_el = batch.per_element(w_total)
        batch.scatter("weight", sums1[3] / w_total)
        batch.scatter("mean", sums1[4] / w_el)
        batch.scatter("var", sums2[0] / w_el)
        super()._sync_apply(batch, sums1, maxes, sums2)
