"""Normalisation by running statistics: :class:`RunningNorm`."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from statplug.stats.base import NanPolicy, real_number
from statplug.stats.holder import StatHolder
from statplug.stats.merge import host_reads_free
from statplug.stats.moments import RunningMoments

__all__ = ["RunningNorm"]

_FINITE_MAX = sys.float_info.max
_EPS_ON = ("var", "std")
# torch's grain size: elementwise ops on at most this many elements run on one thread.
_PLAIN_OPS = 32768


@dataclass(frozen=True)
class _EvalParams:
    """Eval-mode shift and scale, with what they were computed from."""

    config: tuple[object, ...]  # count, input dtype, accumulator dtype, device, eps, eps_on
    state: tuple[Tensor, ...]  # copies of mean, m2 (and the total weight of a weighted stat)
    params: tuple[Tensor, Tensor, bool | Tensor]


class RunningNorm(StatHolder):
    r"""Normalise inputs by an exact running mean and population variance.

    ``y = (x - mean) / sqrt(var + eps)`` (or ``/ (std + eps)`` with ``eps_on="std"``, as rsl_rl
    does), then clipped to ``[-clip, clip]`` when ``clip`` is set. ``var`` is the population
    variance (ddof=0). A feature whose ``var + eps`` is 0 (constant, with ``eps=0``) maps to 0.
    In ``train()`` mode :meth:`forward` updates the statistics with ``x`` and then normalises; in
    ``eval()`` mode it only normalises. Before two samples have been seen it returns ``x``
    unchanged. The statistics live in the submodule ``moments`` (a :class:`RunningMoments`), so
    they are saved, moved, synced and audited like any stat.

    Args:
        shape: feature shape.
        eps: added to the variance (or the std). Default: 1e-8.
        clip: clip the output to ``[-clip, clip]``. Default: None (no clipping).
        accumulator_dtype: Default: ``torch.float64``.
        nan_policy: Default: ``"raise"``.
        eps_on: ``"var"`` or ``"std"``: where ``eps`` is added. Default: ``"var"``.
        weighted: accept per-row ``weight`` (see :class:`RunningMoments`). Default: False.
        device: where to create the buffers. Default: the default device.

    Shape:
        - Input: :math:`(*, \text{shape})`; Output: same shape and dtype as the input.

    Example:
        >>> import torch
        >>> from statplug import RunningNorm
        >>> norm = RunningNorm(3)
        >>> y = norm(torch.randn(256, 3) * 5 + 2)   # train mode: update, then normalise
        >>> bool(y.mean(0).abs().max() < 1e-5)
        True
        >>> bool((y.std(0, unbiased=False) - 1).abs().max() < 1e-4)
        True
        >>> _ = norm.eval()
        >>> norm.inverse(norm(torch.ones(1, 3))).round(decimals=4).tolist()
        [[1.0, 1.0, 1.0]]
    """

    _version = 1
    _held = "moments"
    # Host-side constants, never state: `fixed`'s (mean, m2) kept to survive reset_parameters();
    # the eval-mode parameters of the current statistics, recomputed when those change.
    _statplug_unregistered_ok = ("_fixed", "_eval_cache")

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        eps: float = 1e-8,
        clip: float | None = None,
        accumulator_dtype: torch.dtype = torch.float64,
        nan_policy: NanPolicy = "raise",
        eps_on: Literal["var", "std"] = "var",
        weighted: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if eps_on not in _EPS_ON:
            raise ValueError(f"RunningNorm: `eps_on` must be one of {_EPS_ON}, got {eps_on!r}")
        self.eps_on = eps_on
        self.eps = real_number(
            "RunningNorm", "eps", eps, low=0.0, high=_FINITE_MAX, expected="a finite number >= 0"
        )
        self.clip = None if clip is None else real_number(
            "RunningNorm", "clip", clip, low=0.0, high=_FINITE_MAX, low_open=True,
            expected="a finite positive number or None",
        )
        # (mean, m2) of a normaliser built by `fixed`: configuration, like eps, that
        # reset_parameters() restores (kept off the device: to_empty() would leave garbage).
        self._fixed: tuple[Tensor, Tensor] | None = None
        self._eval_cache: _EvalParams | None = None
        self.moments = RunningMoments(
            shape, accumulator_dtype=accumulator_dtype, nan_policy=nan_policy,
            weighted=weighted, device=device,
        )
        # Named after the normaliser in messages until a model walk gives it its qualified name.
        self.moments.stat_name = "RunningNorm.moments"

    @classmethod
    def fixed(
        cls,
        mean: Sequence[float] | Tensor,
        std: Sequence[float] | Tensor,
        *,
        eps: float = 0.0,
        clip: float | None = None,
        accumulator_dtype: torch.dtype = torch.float64,
    ) -> RunningNorm:
        """A frozen normaliser from known constants, e.g. an image data set's mean and std.

        It holds the state of having seen the two samples ``mean - std`` and ``mean + std`` (whose
        mean and population std are exactly the constants) and is frozen, so it is saved, moved
        and loaded like any other normaliser.

        Example:
            >>> import torch
            >>> from statplug import RunningNorm
            >>> norm = RunningNorm.fixed([0.5, 1.0], [0.25, 2.0])
            >>> norm(torch.tensor([[1.0, 3.0]])).tolist()
            [[2.0, 1.0]]
        """
        m, s = _constants("mean", mean), _constants("std", std)
        if m.shape != s.shape or m.dim() == 0:
            raise ValueError(
                f"RunningNorm.fixed: `mean` and `std` must have the same non-scalar shape, got "
                f"{tuple(m.shape)} and {tuple(s.shape)}"
            )
        if not bool(m.isfinite().all()):
            raise ValueError(f"RunningNorm.fixed: every `mean` must be finite, got {m.tolist()}")
        if not bool((s.isfinite() & (s > 0)).all()):
            raise ValueError(
                f"RunningNorm.fixed: every `std` must be positive and finite, got {s.tolist()}"
            )
        norm = cls(tuple(m.shape), eps=eps, clip=clip, accumulator_dtype=accumulator_dtype)
        acc = norm.moments.accumulator_dtype
        m2 = 2 * s * s  # computed in float64, then stored
        stored_var = m2.to(acc) / 2
        if not bool((m.to(acc).isfinite() & stored_var.isfinite() & (stored_var > 0)).all()):
            raise ValueError(
                f"RunningNorm.fixed: `mean` and `std` must be representable in {acc} (got mean "
                f"{m.tolist()}, std {s.tolist()}); build it with accumulator_dtype=torch.float64"
            )
        norm._fixed = (m, m2)
        norm._load_fixed()
        return norm

    def _load_fixed(self) -> None:
        """Hold the constants of :meth:`fixed`, frozen (works on the meta device too)."""
        assert self._fixed is not None
        mean, m2 = self._fixed
        m = self.moments
        with torch.no_grad():
            m.reset()
            m.count.fill_(2)
            m.mean.copy_(mean.to(m.accumulator_dtype))
            m.m2.copy_(m2.to(m.accumulator_dtype))
            m.settle_()
        m.freeze()

    @classmethod
    def from_moments(
        cls,
        mean: Sequence[float] | Tensor | Any,
        var: Sequence[float] | Tensor | Any,
        count: int | float | Tensor | Any,
        *,
        eps: float = 1e-8,
        clip: float | None = None,
        eps_on: Literal["var", "std"] = "var",
        accumulator_dtype: torch.dtype = torch.float64,
    ) -> RunningNorm:
        """A normaliser holding known moments: ``count`` samples of ``mean`` and population
        variance ``var`` (tensors, numpy arrays or sequences), e.g. another library's statistics.

        The state is ``count``, ``mean`` and ``m2 = var * count``, loaded as a checkpoint would
        be (so a later sync counts it once, not once per rank); the normaliser is not frozen.
        An integer ``count`` (int, numpy or torch integer) is kept exactly as int64. A float
        count that is not an integer -- gymnasium's and SB3's ``RunningMeanStd`` start from a
        prior of count 1e-4, so theirs read ``n + 1e-4`` -- is rounded to the nearest integer:
        ``mean`` and ``var`` are kept as given, so the normalised outputs stay the same, and the
        prior's weight of 1e-4 sample is dropped. A count that rounds to 0 gives an empty
        normaliser (``mean`` and ``var`` are then dropped; it returns its input until it has seen
        two samples). A 0-dim ``mean`` gives shape ``(1,)``.

        Example:
            >>> import torch
            >>> from statplug import RunningNorm
            >>> norm = RunningNorm.from_moments([1.0, -2.0], [4.0, 0.25], 1000, eps=0.0)
            >>> norm.count.item(), norm.var.tolist()
            (1000, [4.0, 0.25])
            >>> norm.eval()(torch.tensor([[3.0, -1.0]])).tolist()
            [[1.0, 2.0]]
            >>> RunningNorm.from_moments([0.0], [1.0], 2.0001).count.item()   # rounded
            2
        """
        m, v = _constants("mean", mean, "from_moments"), _constants("var", var, "from_moments")
        if m.dim() == 0:
            m, v = m.reshape(1), v.reshape(-1)
        if m.shape != v.shape:
            raise ValueError(
                f"RunningNorm.from_moments: `mean` and `var` must have the same shape, got "
                f"{tuple(m.shape)} and {tuple(v.shape)}"
            )
        if not bool(m.isfinite().all()):
            raise ValueError(
                f"RunningNorm.from_moments: every `mean` must be finite, got {m.tolist()}"
            )
        if not bool((v.isfinite() & (v >= 0)).all()):
            raise ValueError(
                f"RunningNorm.from_moments: every `var` must be finite and >= 0 (a population "
                f"variance), got {v.tolist()}"
            )
        n = _sample_count(count)
        norm = cls(tuple(m.shape), eps=eps, clip=clip, eps_on=eps_on,
                   accumulator_dtype=accumulator_dtype)
        moments = norm.moments
        acc = moments.accumulator_dtype
        state = moments.state_dict()
        state["count"] = torch.tensor(n, dtype=torch.int64)
        if n == 0:
            m, v = torch.zeros_like(m), torch.zeros_like(v)
        state["mean"] = m.to(acc)
        state["m2"] = (v * n).to(acc)  # in float64, then stored
        if not bool((state["mean"].isfinite() & state["m2"].isfinite()).all()):
            raise ValueError(
                f"RunningNorm.from_moments: `mean` and `var * count` must be representable in "
                f"{acc}; build it with accumulator_dtype=torch.float64"
            )
        moments.load_state_dict(state)
        return norm

    def fold_into(self, linear: torch.nn.Linear) -> torch.nn.Linear:
        """A new ``nn.Linear`` equal to ``linear(norm(x))`` with this normaliser in eval mode:
        the normalisation folded into the weights, for export (one matmul, no statistics).

        With ``y = (x - mean) * s`` (``s = 1 / sqrt(var + eps)``, or ``1 / (std + eps)`` with
        ``eps_on="std"``): ``W' = W * s`` (column ``j`` scaled by ``s_j``) and
        ``b' = b - W' @ mean``, computed in float64 and stored in ``linear``'s dtype and device.
        A bias is added when ``linear`` has none. The statistics are those of now: later updates
        do not change the result. Before two samples the normaliser is the identity, so the copy
        equals ``linear``; a constant feature with ``var + eps == 0`` (it maps to 0) gets a zero
        column. Folding cannot express clipping: a normaliser with ``clip`` raises ``ValueError``.
        As with any fold, ``W' @ x + b'`` cancels in ``linear``'s dtype when ``|mean|`` is large
        against the std (float32 keeps about ``7 - log10(|mean| / std)`` digits).

        Example:
            >>> import torch
            >>> from statplug import RunningNorm
            >>> norm = RunningNorm.from_moments([1.0, 2.0, 3.0], [4.0, 1.0, 0.25], 100).eval()
            >>> linear = torch.nn.Linear(3, 2)
            >>> folded = norm.fold_into(linear)
            >>> x = torch.randn(5, 3)
            >>> torch.allclose(folded(x), linear(norm(x)), rtol=1e-5, atol=1e-6)
            True
        """
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(
                f"RunningNorm.fold_into: `linear` must be a torch.nn.Linear, got "
                f"{type(linear).__name__}"
            )
        if self.clip is not None:
            raise ValueError(
                f"RunningNorm.fold_into: this normaliser clips its output to +-{self.clip}, which "
                f"a Linear layer cannot express; fold a normaliser built with clip=None, or keep "
                f"the normaliser (unfolded) in the exported model"
            )
        n = self.moments.n_features
        if len(self.moments.shape) != 1 or linear.in_features != n:
            raise ValueError(
                f"RunningNorm.fold_into: the normaliser's shape {self.moments.shape} must be "
                f"({linear.in_features},), the in_features of `linear`; fold into a Linear that "
                f"takes the normalised features"
            )
        shift, scale, _ = self._affine()
        with torch.no_grad():
            scale = scale.to(linear.weight.device, torch.float64)
            shift = shift.to(linear.weight.device, torch.float64)
            weight = linear.weight.detach().to(torch.float64) * scale
            bias = -(weight @ shift)
            if linear.bias is not None:
                bias = bias + linear.bias.detach().to(torch.float64)
            folded = torch.nn.Linear(
                n, linear.out_features, bias=True, device=linear.weight.device,
                dtype=linear.weight.dtype,
            )
            folded.weight.copy_(weight)
            folded.bias.copy_(bias)
        folded.train(linear.training)
        return folded

    # Read-outs; the rules every stat follows delegate to the moments (StatHolder).
    @property
    def sample_var(self) -> Tensor:
        return self.moments.sample_var

    def reset_parameters(self) -> None:
        """Empty and unfreeze the statistics -- or, for a normaliser built by :meth:`fixed`,
        hold its constants again (the meta-device flow: ``to_empty()`` then this)."""
        if self._fixed is not None:
            self._load_fixed()
        else:
            self.moments.reset_parameters()

    @property
    def mean(self) -> Tensor:
        return self.moments.mean

    @property
    def var(self) -> Tensor:
        return self.moments.var

    @property
    def std(self) -> Tensor:
        return self.moments.std

    def _affine(self) -> tuple[Tensor, Tensor, bool | Tensor]:
        """``(shift, scale)`` in the accumulator dtype with ``y = (x - shift) * scale``, and
        whether two samples were seen (the identity before: shift 0, scale 1), decided on the
        host when that is free and on the device otherwise. ``scale`` is ``1 / sqrt(var + eps)``
        (``1 / (std + eps)`` with ``eps_on="std"``), and 0 where that is infinite: a constant
        feature with ``eps=0`` maps to 0, not NaN. ``shift`` may be the ``mean`` buffer itself:
        copy it before autograd can save it."""
        m = self.moments
        m._check_pinned_dtypes()  # a wrapper's `buffer.data` cast: raise, never use them
        mean, m2, n, count = m.flat("mean"), m.flat("m2"), m._n(), m.state("count")
        on_host = host_reads_free(n)
        ready: bool | Tensor = int(count) >= 2 if on_host else count >= 2
        if ready is False:
            ones = torch.ones(m.n_features, dtype=mean.dtype, device=mean.device)
            return ones * 0, ones, False
        var = m2 / (float(n) if on_host else n)  # n > 0 once ready
        if self.eps_on == "var":
            scale = (var + self.eps).rsqrt()
        else:
            scale = (var.sqrt() + self.eps).reciprocal()
        if self.eps == 0:
            scale = torch.where(scale.isinf(), 0.0, scale)
        if isinstance(ready, Tensor):
            mean = torch.where(ready, mean, 0.0)
            scale = torch.where(ready, scale, 1.0)
        return mean, scale, ready

    def forward(
        self, x: Tensor, mask: Tensor | None = None, weight: Tensor | None = None
    ) -> Tensor:
        """Normalise ``x``; in ``train()`` mode update the statistics with it first (only with
        the rows ``mask`` keeps, weighted by ``weight``: see :meth:`RunningMoments.update`;
        every row is normalised).

        One fused kernel normalises large batches (torch's batch norm in inference mode, fed the
        running mean and scale), as ``nn.BatchNorm`` does; small ones take two plain ops.
        Returns the input's dtype for floating inputs; integer inputs come back in the
        accumulator dtype.
        """
        m = self.moments
        if self.training:
            m.update(x, mask, weight)
        work = x if x.is_floating_point() else x.to(m.accumulator_dtype)
        rows = work if work.dim() == 2 and len(m.shape) == 1 else work.reshape(-1, m.n_features)
        # In the input's dtype (float32 for float16/bfloat16: the kernel's mixed mode).
        dtype = torch.float32 if work.dtype in (torch.float16, torch.bfloat16) else work.dtype
        shift, scale, ready = self._params(dtype)
        if rows.is_cpu and rows.numel() <= _PLAIN_OPS:
            # Plain ops: they stay on one thread, where the kernel wakes the intra-op pool even
            # for one row (see merge.py), and cost less up to about this size.
            y = ((rows - shift) * scale).to(work.dtype)
        else:  # BatchNorm's inference kernel: (x - shift) / sqrt(1 + 0) * scale
            y = torch.batch_norm(rows, scale, None, shift, torch.ones_like(scale), False, 0.0,
                                 0.0, False)
        return self._clipped(y if y.shape == work.shape else y.view(work.shape), ready)

    def _params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool | Tensor]:
        """:meth:`_affine` in ``dtype``, as fresh tensors (autograd may save them, never the
        buffers the next update writes). In eval mode, eager on the CPU, they are kept with a
        copy of the statistics they came from and reused while the statistics are equal to it,
        value for value (the count, and ``torch.equal`` of the rest): whatever wrote the
        buffers -- an update, a load, a collective, another process through shared memory,
        ``.data`` -- the output follows."""
        if self.training:
            return self._fresh_params(dtype)
        m = self.moments
        count = m.state("count")
        if not host_reads_free(count):
            return self._fresh_params(dtype)
        state = (m.state("mean"), m.state("m2"), *((m.state("weight_sum"),) if m.weighted else ()))
        config = (int(count), dtype, state[0].dtype, state[0].device, self.eps, self.eps_on)
        cached = self._eval_cache
        if cached is not None and cached.config == config and all(
            torch.equal(now, then) for now, then in zip(state, cached.state, strict=True)
        ):
            return cached.params
        params = self._fresh_params(dtype)
        if not isinstance(params[2], Tensor):
            self._eval_cache = _EvalParams(config, tuple(t.clone() for t in state), params)
        return params

    def _fresh_params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool | Tensor]:
        shift, scale, ready = self._affine()
        return shift.to(dtype, copy=True), scale.to(dtype), ready

    def inverse(self, y: Tensor) -> Tensor:
        """Undo :meth:`forward` (up to clipping): ``x = y * sqrt(var + eps) + mean``."""
        shift, scale, _ = self._affine()
        std = torch.where(scale > 0, scale.reciprocal(), 0.0)
        rows = y.reshape(-1, self.moments.n_features)
        out = (rows.to(shift.dtype) * std + shift).view(y.shape)
        return out.to(y.dtype) if y.is_floating_point() else out

    def extra_repr(self) -> str:
        eps_on = "" if self.eps_on == "var" else f", eps_on={self.eps_on!r}"
        return f"eps={self.eps}, clip={self.clip}{eps_on}"


def _constants(name: str, value: Any, method: str = "fixed") -> Tensor:
    """``value`` as a float64 CPU tensor (whatever the default device), or ``ValueError``."""
    try:
        if isinstance(value, Tensor):
            if value.is_complex() or value.device.type == "meta":
                raise TypeError(f"a {value.dtype} tensor on {value.device}")
            return value.detach().to(device="cpu", dtype=torch.float64)
        return torch.as_tensor(value, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"RunningNorm.{method}: `{name}` must be a sequence or tensor of real numbers, got "
            f"{value!r} ({err})"
        ) from err


def _sample_count(count: Any) -> int:
    """``count`` as an int >= 0: integers exactly, a float rounded to the nearest integer (the
    1e-4 prior of gymnasium's and SB3's ``RunningMeanStd``), or ``ValueError``."""
    value = count
    if isinstance(value, Tensor) and value.numel() == 1 and value.device.type != "meta":
        value = value.detach().cpu().reshape(()).item()
    elif hasattr(value, "item") and getattr(value, "size", None) == 1:  # a numpy scalar/array
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        n = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        n = round(float(value))
    else:
        n = -1
    if not 0 <= n < 2**63:
        raise ValueError(
            f"RunningNorm.from_moments: `count` must be a number of samples, an integer or a "
            f"finite float >= 0 (rounded), got {count!r}"
        )
    return n
