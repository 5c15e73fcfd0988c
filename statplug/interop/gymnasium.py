"""gymnasium's ``NormalizeObservation`` / ``RunningMeanStd`` to and from
:class:`~statplug.RunningNorm`, and :class:`NormalizeObservation`, a gymnasium wrapper backed by
one.

gymnasium is imported only when a function here runs or the wrapper class is first looked up
(``statplug.interop.NormalizeObservation``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from statplug._extras import require
from statplug.interop._rms import PRIOR_COUNT, fill_rms, is_running_mean_std, norm_from_rms
from statplug.stats.base import Stat, real_number
from statplug.stats.merge import chan_merge
from statplug.stats.norm import RunningNorm

__all__ = ["NormalizeObservation", "from_gymnasium", "to_gymnasium"]

_DEFAULT_EPS = 1e-8  # gymnasium's NormalizeObservation default


def _target_kind(owner: str, target: Any) -> str:
    """``"wrapper"`` (a NormalizeObservation: ``obs_rms`` and ``epsilon``) or ``"rms"``."""
    require("gymnasium", f"statplug.interop.{owner}")
    if hasattr(target, "obs_rms") and hasattr(target, "epsilon"):
        return "wrapper"
    if is_running_mean_std(target):
        return "rms"
    raise ValueError(
        f"{owner}: expected gymnasium's NormalizeObservation (single or vector) or its "
        f"RunningMeanStd, got {type(target).__name__}; for a wrapper inside others pass the "
        f"NormalizeObservation itself"
    )


def from_gymnasium(wrapper_or_running_mean_std: Any, *, eps: float | None = None) -> RunningNorm:
    """A :class:`~statplug.RunningNorm` holding gymnasium's observation statistics.

    Takes a ``gymnasium.wrappers.NormalizeObservation`` (or its vector version) or a
    ``gymnasium.wrappers.utils.RunningMeanStd``. ``eps`` defaults to the wrapper's ``epsilon``
    (1e-8, gymnasium's default, for a bare ``RunningMeanStd``), so the normaliser gives the
    wrapper's outputs. gymnasium's count starts at a prior of 1e-4 (mean 0, var 1) and reads
    ``n + 1e-4`` after ``n`` observations: it is rounded to ``n``, mean and var are kept as they
    are (so the outputs are the same); a fresh wrapper gives an empty normaliser. The result is
    in ``train()`` mode; call ``.eval()`` to only normalise.

    Example:
        >>> import gymnasium as gym                                       # doctest: +SKIP
        >>> env = gym.wrappers.NormalizeObservation(gym.make("CartPole-v1"))  # doctest: +SKIP
        >>> norm = from_gymnasium(env).eval()                             # doctest: +SKIP
    """
    kind = _target_kind("from_gymnasium", wrapper_or_running_mean_std)
    rms = wrapper_or_running_mean_std
    if kind == "wrapper":
        default = float(rms.epsilon)
        rms = rms.obs_rms
    else:
        default = _DEFAULT_EPS
    eps = default if eps is None else eps
    return norm_from_rms(rms, eps=eps, clip=None)


def to_gymnasium(norm: RunningNorm, target: Any) -> None:
    """Write ``norm``'s statistics into gymnasium's ``NormalizeObservation`` (its ``obs_rms``
    and ``epsilon``) or a ``RunningMeanStd``, in place, in the target's dtype (float32 for a
    float32 observation space).

    The count is written as a float (gymnasium's type; exact up to 2**53); an empty normaliser
    writes gymnasium's fresh state (count 1e-4, mean 0, var 1). gymnasium normalises with
    ``sqrt(var + epsilon)``, ``epsilon > 0``, and never clips: filling a wrapper from a normaliser
    with ``eps_on="std"``, ``eps=0`` or a ``clip`` raises ``ValueError``.
    """
    kind = _target_kind("to_gymnasium", target)
    if kind == "wrapper":
        if not isinstance(norm, RunningNorm) or norm.eps_on != "var" or norm.clip is not None:
            raise ValueError(
                f"to_gymnasium: gymnasium's NormalizeObservation normalises with "
                f"sqrt(var + epsilon) and does not clip: `norm` must be a RunningNorm with "
                f"eps_on='var' and clip=None, got {norm!r}; fill its `obs_rms` instead to copy "
                f"the statistics only"
            )
        if not norm.eps > 0:
            raise ValueError(
                f"to_gymnasium: gymnasium needs epsilon > 0, got a normaliser with eps="
                f"{norm.eps}; build it with eps > 0"
            )
        fill_rms("to_gymnasium", norm, target.obs_rms)
        target.epsilon = norm.eps
    else:
        fill_rms("to_gymnasium", norm, target)


# ---------------------------------------------------------------------- the wrapper
_DOC = """A gymnasium observation wrapper that normalises with a :class:`~statplug.RunningNorm`.

    A drop-in for ``gymnasium.wrappers.NormalizeObservation``: each observation (at ``reset`` and
    ``step``) first updates the statistics, then comes back as
    ``float32((obs - mean) / sqrt(var + eps))`` with the observation's shape, and the observation
    space becomes an unbounded float32 ``Box``, as gymnasium's. The statistics are exact
    (float64 by default, int64 count), live in the module ``.norm`` and so are saved with
    :meth:`state_dict`, synced across ranks with ``sync_stats(wrapper)`` (the wrapper is an
    iterable of its one stat; ``sync_stats(wrapper.norm)`` is the same) and frozen for
    evaluation with ``update_running_mean = False``.

    Without the prior (the default) each observation counts once, and, as any
    :class:`~statplug.RunningNorm`, the wrapper returns the observation itself until it has seen
    two. With ``gymnasium_prior=True`` it normalises as gymnasium does, with gymnasium's prior
    (count 1e-4, mean 0, variance 1) merged into the statistics (Chan's merge) when it
    normalises: ``.norm`` still holds only the observations (an exact integer count, synced and
    saved as such), and the prior is a setting, added once, not once per rank.

    Args:
        env: the environment (its observation space must have a shape).
        gymnasium_prior: normalise with gymnasium's prior merged in. Default: False.
        accumulator_dtype: the statistics' dtype. Default: ``torch.float64``.
        eps: added to the variance. Default: 1e-8 (gymnasium's ``epsilon``).

    Example:
        >>> import gymnasium as gym                                      # doctest: +SKIP
        >>> from statplug.interop import NormalizeObservation           # doctest: +SKIP
        >>> env = NormalizeObservation(gym.make("CartPole-v1"))         # doctest: +SKIP
        >>> obs, info = env.reset(seed=0)                                # doctest: +SKIP
        >>> env.norm.count.item()                                        # doctest: +SKIP
        1
    """


@functools.cache
def _wrapper_class() -> type:
    gym = require("gymnasium", "statplug.interop.NormalizeObservation")
    observation_wrapper: Any = gym.ObservationWrapper
    record_args: Any = gym.utils.RecordConstructorArgs

    class NormalizeObservation(observation_wrapper, record_args):  # type: ignore[misc]
        __doc__ = _DOC

        def __init__(
            self,
            env: Any,
            *,
            gymnasium_prior: bool = False,
            accumulator_dtype: torch.dtype = torch.float64,
            eps: float = _DEFAULT_EPS,
        ) -> None:
            record_args.__init__(
                self, gymnasium_prior=gymnasium_prior, accumulator_dtype=accumulator_dtype,
                eps=eps,
            )
            observation_wrapper.__init__(self, env)
            shape = env.observation_space.shape
            if shape is None:
                raise ValueError(
                    f"NormalizeObservation: the observation space must have a shape, got "
                    f"{env.observation_space}; normalise a Box observation space"
                )
            self._obs_shape: tuple[int, ...] = tuple(shape)
            self.observation_space = gym.spaces.Box(
                low=-np.inf, high=np.inf, shape=self._obs_shape, dtype=np.float32
            )
            self.gymnasium_prior = bool(gymnasium_prior)
            eps = real_number(
                "NormalizeObservation", "eps", eps, low=0.0, high=math.inf,
                expected="a finite number >= 0",
            )
            # A scalar observation is one feature.
            self.norm = RunningNorm(
                self._obs_shape or (1,), eps=eps, accumulator_dtype=accumulator_dtype
            ).eval()  # normalises only: `observation` updates it explicitly

        @property
        def update_running_mean(self) -> bool:
            """Whether observations update the statistics (False: frozen, for evaluation)."""
            return not self.norm.frozen

        @update_running_mean.setter
        def update_running_mean(self, setting: bool) -> None:
            if setting:
                self.norm.unfreeze()
            else:
                self.norm.freeze()

        def observation(self, observation: Any) -> np.ndarray:
            """Update the statistics with ``observation`` (unless frozen), then normalise it."""
            norm = self.norm
            x = torch.from_numpy(
                np.asarray(observation, dtype=np.float64).reshape(1, *norm.moments.shape)
            ).to(norm.moments.count.device)  # where the statistics are (a no-op on the CPU)
            with torch.no_grad():
                if self.gymnasium_prior:
                    norm.update(x)
                    y = self._with_prior(x)
                elif norm.training:  # forward updates, then normalises
                    y = norm(x)
                else:
                    norm.update(x)
                    y = norm(x)
            return y.cpu().numpy().reshape(self._obs_shape).astype(np.float32)

        def _with_prior(self, x: Tensor) -> Tensor:
            """``x`` normalised by the observations' moments merged with gymnasium's prior."""
            m = self.norm.moments
            mean, m2 = m.mean.reshape(-1).double(), m.m2.reshape(-1).double()
            prior_n = torch.tensor(PRIOR_COUNT, dtype=torch.float64)
            merged = chan_merge(
                prior_n, torch.zeros_like(mean), torch.full_like(mean, PRIOR_COUNT),
                m.count.double(), mean, m2,
            )
            var = merged.m2 / merged.n
            return (x.reshape(1, -1) - merged.mean) / (var + self.norm.eps).sqrt()

        def state_dict(self) -> dict[str, Tensor]:
            """The statistics (``self.norm.state_dict()``): plain tensors, loadable with
            ``torch.load(path, weights_only=True)``."""
            return dict(self.norm.state_dict())

        def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
            """Load statistics saved by :meth:`state_dict` (checked first; atomic)."""
            self.norm.load_state_dict(state_dict)

        def __iter__(self) -> Iterator[Stat]:
            """The wrapper's stats (one), so ``sync_stats(wrapper)`` finds them."""
            return iter([self.norm.moments])

    NormalizeObservation.__module__ = __name__
    NormalizeObservation.__qualname__ = "NormalizeObservation"
    return NormalizeObservation


if TYPE_CHECKING:
    NormalizeObservation: Any


def __getattr__(name: str) -> Any:
    if name == "NormalizeObservation":
        return _wrapper_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
