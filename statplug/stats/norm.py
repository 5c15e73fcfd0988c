"""Normalisation by running statistics: :class:`RunningNorm`."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from statplug._buffers import PinnedDtypeModule
from statplug.stats.base import NanPolicy, _host_count, real_number
from statplug.stats.moments import RunningMoments

__all__ = ["RunningNorm"]

_LOW = (torch.float16, torch.bfloat16)
_FINITE_MAX = sys.float_info.max
_F32 = torch.float32


class RunningNorm(PinnedDtypeModule):
    r"""Normalise inputs by an exact running mean and population variance.

    ``y = (x - mean) / sqrt(var + eps)``, then clipped to ``[-clip, clip]`` when ``clip`` is set.
    In ``train()`` mode :meth:`forward` updates the statistics with ``x`` and then normalises; in
    ``eval()`` mode it only normalises. Before two samples have been seen it returns ``x``
    unchanged. The statistics live in the submodule ``moments`` (a :class:`RunningMoments`), so
    they are saved, moved, synced and audited like any stat.

    Args:
        shape: feature shape.
        eps: added to the variance. Default: 1e-8.
        clip: clip the output to ``[-clip, clip]``. Default: None (no clipping).
        accumulator_dtype: Default: ``torch.float32``.
        nan_policy: Default: ``"raise"``.

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
    # Host-side constants, never state: `fixed`'s (mean, m2) kept to survive reset_parameters(),
    # and the identity's 0 and 1 - eps per dtype and device.
    _statplug_unregistered_ok = ("_fixed", "_constants")

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        eps: float = 1e-8,
        clip: float | None = None,
        accumulator_dtype: torch.dtype = torch.float32,
        nan_policy: NanPolicy = "raise",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
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
        # Constants of the identity before two samples, per (dtype, device): never state.
        self._constants: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
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
        accumulator_dtype: torch.dtype = torch.float32,
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

    # Read-outs and the rules every stat follows delegate to the moments.
    @property
    def count(self) -> Tensor:
        return self.moments.count

    @property
    def n_skipped(self) -> Tensor:
        return self.moments.n_skipped

    @property
    def sample_var(self) -> Tensor:
        return self.moments.sample_var

    def update(self, x: Tensor) -> None:
        """Update the statistics with ``x`` without normalising (as in ``train()`` mode)."""
        self.moments.update(x)

    def merge_(self, other: RunningNorm) -> RunningNorm:
        """Merge another normaliser's statistics (same shape) exactly."""
        if not isinstance(other, RunningNorm):
            raise ValueError(
                f"RunningNorm.merge_: expected a RunningNorm, got {type(other).__name__}"
            )
        self.moments.merge_(other.moments)
        return self

    def reset(self) -> None:
        """Forget every sample (keeps frozen-ness)."""
        self.moments.reset()

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

    def freeze(self) -> RunningNorm:
        """Stop updating the statistics (saved with the state)."""
        self.moments.freeze()
        return self

    def unfreeze(self) -> RunningNorm:
        self.moments.unfreeze()
        return self

    @property
    def frozen(self) -> bool:
        return self.moments.frozen

    def _affine(self) -> tuple[Tensor, Tensor]:
        """(shift, scale) with identity before two samples, decided on the device."""
        m = self.moments
        m._check_pinned_dtypes()  # a wrapper's `buffer.data` cast: raise, never use them
        ready = m.count >= 2
        scale = torch.where(ready, torch.rsqrt(m.var + self.eps), 1.0)
        shift = torch.where(ready, m.mean, 0.0)
        return shift, scale

    def _identity_constants(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """0 and ``1 - eps`` for the identity's mean and variance: 0-dim tensors made once per
        dtype and device (``torch.where`` takes them faster than Python numbers), plain numbers
        under ``torch.compile``, where they are folded into the graph."""
        if torch.compiler.is_compiling():
            return 0.0, 1.0 - self.eps
        key = (like.dtype, like.device)
        pair = self._constants.get(key)
        if pair is None:
            pair = self._constants[key] = (
                torch.zeros((), dtype=like.dtype, device=like.device),
                torch.full((), 1.0 - self.eps, dtype=like.dtype, device=like.device),
            )
        return pair

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x``; in ``train()`` mode update the statistics with it first.

        One fused kernel normalises (torch's batch-norm in inference mode, fed the running mean
        and population variance), as ``nn.BatchNorm`` does. Returns the input's dtype for
        floating inputs; integer inputs come back in the accumulator dtype.
        """
        m = cast(RunningMoments, self._modules["moments"])  # skips nn.Module.__getattr__
        if self.training:
            m.update(x)
        else:
            m._check_pinned_dtypes()  # eval never updates: check before normalising with them
        b = cast(dict[str, Tensor], m._buffers)
        mean, m2, count = b["mean"], b["m2"], b["count"]
        ok: Tensor | None = None
        # Ready (2+ samples): read on the CPU (a memory read), else known on the host right
        # after an update with 2+ rows, else decided on the device below.
        if _host_count(count):
            ready = int(count) >= 2
        else:  # rows skipped for NaN may leave fewer than two samples: decide on the device
            ready = (
                self.training
                and not m._frozen
                and m.nan_policy != "skip"
                and x.numel() >= 2 * m.n_features
            )
        if ready:
            var = m2 / count
            if x.requires_grad and torch.is_grad_enabled():
                # Autograd saves the kernel's mean: never the buffer the next update writes in
                # place (a second call before backward would fail it).
                mean = mean.clone()
        else:
            # Identity until two samples: mean 0 and var + eps == 1 exactly make the kernel
            # return x. Decided on the device (no host read on accelerators or when compiled).
            ok = count >= 2
            zero, one = self._identity_constants(mean)
            mean = torch.where(ok, mean, zero)
            var = torch.where(ok, m2 / count, one)
        acc = m.accumulator_dtype
        same = x.dtype is acc or (acc is _F32 and x.dtype in _LOW)
        if x.dim() == 2 and m._n_dims == 1 and same:
            # The common case: one call into torch's fused kernel, no reshapes.
            y = torch.batch_norm(x, None, None, mean, var, False, 0.0, self.eps, False)
        else:
            work = x if x.is_floating_point() and x.dtype in (acc, *_LOW) else x.to(acc)
            if acc is not _F32 and work.dtype in _LOW:
                work = work.to(acc)
            rows = work.reshape(-1, m.n_features)
            y = torch.batch_norm(
                rows, None, None, mean.reshape(-1), var.reshape(-1), False, 0.0, self.eps, False
            ).view(x.shape)
        if self.clip is not None:
            if ok is None:
                y = y.clamp_(-self.clip, self.clip)
            else:  # no clipping either while the normaliser is still the identity
                bound = torch.where(ok, self.clip, math.inf).to(y.dtype)
                y = torch.clamp(y, -bound, bound)
        return y.to(x.dtype) if x.is_floating_point() and y.dtype is not x.dtype else y

    def inverse(self, y: Tensor) -> Tensor:
        """Undo :meth:`forward` (up to clipping): ``x = y * sqrt(var + eps) + mean``."""
        shift, scale = self._affine()
        out = y.to(shift.dtype) / scale + shift
        return out.to(y.dtype) if y.is_floating_point() else out

    def extra_repr(self) -> str:
        return f"eps={self.eps}, clip={self.clip}"


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
