"""Running statistics to and from the reinforcement-learning libraries, and a gymnasium wrapper.

Each library is an optional dependency, imported only when a function that needs it runs; when it
is missing the call raises :class:`statplug.errors.MissingExtraError` naming the package and the
extra that brings it (``pip install 'statplug[gymnasium]'``, ``'statplug[sb3]'``,
``'statplug[rsl-rl]'``). Nothing here unpickles a file: pass the live library object (load it
with the library's own loader, which you trust, first).

- :func:`from_sb3` / :func:`to_sb3`: stable-baselines3's ``VecNormalize`` (``obs_rms``,
  ``clip_obs``, ``epsilon``; ``ret_rms`` with ``which="ret"``).
- :func:`from_gymnasium` / :func:`to_gymnasium`: gymnasium's ``NormalizeObservation`` or its
  ``RunningMeanStd``.
- :func:`from_rsl_rl` / :func:`to_rsl_rl`: rsl_rl's ``EmpiricalNormalization``.
- :class:`NormalizeObservation`: a gymnasium observation wrapper backed by a
  :class:`~statplug.RunningNorm` (saved in a ``state_dict``, synced with ``sync_stats``).

The libraries keep a float count that starts at a prior of 1e-4 (gymnasium, SB3); statplug's
count is an exact int64, so an imported count is rounded to the nearest integer (see
:meth:`statplug.RunningNorm.from_moments`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from statplug.interop.gymnasium import from_gymnasium, to_gymnasium
from statplug.interop.rsl_rl import from_rsl_rl, to_rsl_rl
from statplug.interop.sb3 import from_sb3, to_sb3

if TYPE_CHECKING:
    from statplug.interop.gymnasium import NormalizeObservation


def __getattr__(name: str) -> Any:
    # The wrapper subclasses gymnasium's ObservationWrapper: built on first use only.
    if name == "NormalizeObservation":
        from statplug.interop import gymnasium

        return gymnasium.NormalizeObservation
    raise AttributeError(f"module 'statplug.interop' has no attribute {name!r}")


__all__ = [
    "NormalizeObservation",
    "from_gymnasium",
    "from_rsl_rl",
    "from_sb3",
    "to_gymnasium",
    "to_rsl_rl",
    "to_sb3",
]
