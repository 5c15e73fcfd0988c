"""Normalisation by running statistics: :class:`RunningNorm`."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from statplug.stats.base import NanPolicy, real_number
from statplug.stats.holder import StatHolder
from statplug.stats.moments import RunningMoments

__all__ = ["RunningNorm"]

_FINITE_MAX = sys.float_info.max
_EPS_ON = ("var", "std")


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
    # Host-side constants, never state: `fixed`'s (mean, m2) kept to survive reset_parameters().
    _statplug_unregistered_ok = ("_fixed",)

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        eps: float = 1e-8,
        clip: float | None = None,
        accumulator_dtype: torch.dtype = torch.float64,
        nan_policy: NanPolicy = "raise",
        eps_on: Literal["var", "std"] = "var",
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
        self.moments = RunningMoments(
            shape, accumulator_dtype=accumulator_dtype, nan_policy=nan_policy, device=device
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

    def _affine(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool | Tensor]:
        """(shift, variance) in ``dtype`` such that ``(x - shift) / sqrt(variance + eps')``
        normalises (``eps'`` is :attr:`_kernel_eps`), and whether two samples were seen: the
        identity before, decided on the host when that is free and on the device otherwise. A
        zero ``var + eps`` becomes an infinite variance: a constant feature maps to 0, not NaN."""
        m = self.moments
        m._check_pinned_dtypes()  # a wrapper's `buffer.data` cast: raise, never use them
        mean, var = m.mean, m.var
        if self.eps_on == "std":
            var = (var.sqrt() + self.eps).square()
        var = torch.where(var + self._kernel_eps == 0, math.inf, var)
        # Before two samples: mean 0 and var + eps == 1, the identity.
        mean, var, ready = self._until_ready((mean, var), (0.0, 1.0 - self._kernel_eps))
        # Fresh tensors: autograd may save them, never the buffers the next update writes.
        return mean.to(dtype, copy=True), var.to(dtype), ready

    @property
    def _kernel_eps(self) -> float:
        return self.eps if self.eps_on == "var" else 0.0

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x``; in ``train()`` mode update the statistics with it first.

        One fused kernel normalises (torch's batch norm in inference mode, fed the running mean
        and population variance), as ``nn.BatchNorm`` does. Returns the input's dtype for
        floating inputs; integer inputs come back in the accumulator dtype.
        """
        m = self.moments
        if self.training:
            m.update(x)
        work = x if x.is_floating_point() else x.to(m.accumulator_dtype)
        # float16/bfloat16 inputs normalise with float32 statistics (the kernel's mixed mode).
        low = work.dtype in (torch.float16, torch.bfloat16)
        shift, var, ready = self._affine(torch.float32 if low else work.dtype)
        rows = work.reshape(-1, m.n_features)
        y = torch.batch_norm(rows, None, None, shift.reshape(-1), var.reshape(-1), False, 0.0,
                             self._kernel_eps, False).view(work.shape)
        return self._clipped(y, ready)

    def inverse(self, y: Tensor) -> Tensor:
        """Undo :meth:`forward` (up to clipping): ``x = y * sqrt(var + eps) + mean``."""
        acc = self.moments.accumulator_dtype
        shift, var, _ = self._affine(acc)
        out = y.to(acc) * (var + self._kernel_eps).sqrt().nan_to_num(posinf=0.0) + shift
        return out.to(y.dtype) if y.is_floating_point() else out

    def extra_repr(self) -> str:
        eps_on = "" if self.eps_on == "var" else f", eps_on={self.eps_on!r}"
        return f"eps={self.eps}, clip={self.clip}{eps_on}"


def _constants(name: str, value: Any) -> Tensor:
    """``value`` as a float64 CPU tensor (whatever the default device), or ``ValueError``."""
    try:
        if isinstance(value, Tensor):
            if value.is_complex() or value.device.type == "meta":
                raise TypeError(f"a {value.dtype} tensor on {value.device}")
            return value.detach().to(device="cpu", dtype=torch.float64)
        return torch.as_tensor(value, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"RunningNorm.fixed: `{name}` must be a sequence or tensor of real numbers, got "
            f"{value!r} ({err})"
        ) from err
