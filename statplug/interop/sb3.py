"""stable-baselines3's ``VecNormalize`` to and from :class:`~statplug.RunningNorm`."""

from __future__ import annotations

import math
from typing import Any, Literal

from statplug._extras import require
from statplug.interop._rms import fill_rms, norm_from_rms
from statplug.stats.norm import RunningNorm

__all__ = ["from_sb3", "to_sb3"]

_WHICH = ("obs", "ret")


def _vec_normalize(owner: str, vec_normalize: Any) -> Any:
    """``vec_normalize`` itself, or the ``VecNormalize`` inside a stack of VecEnv wrappers."""
    require("stable_baselines3", f"statplug.interop.{owner}")
    from stable_baselines3.common.vec_env import VecNormalize, unwrap_vec_normalize

    if isinstance(vec_normalize, VecNormalize):
        return vec_normalize
    found = unwrap_vec_normalize(vec_normalize) if hasattr(vec_normalize, "venv") else None
    if found is None:
        raise ValueError(
            f"{owner}: `vec_normalize` must be a stable_baselines3 VecNormalize (or a VecEnv "
            f"wrapping one), got {type(vec_normalize).__name__}; to read a saved one, load it "
            f"with VecNormalize.load(path, venv) first"
        )
    return found


def _rms(owner: str, vec: Any, which: str, key: str | None) -> Any:
    if which not in _WHICH:
        raise ValueError(f"{owner}: `which` must be 'obs' or 'ret', got {which!r}")
    if which == "ret":
        return vec.ret_rms
    rms = vec.obs_rms
    if isinstance(rms, dict):
        if key not in rms:
            raise ValueError(
                f"{owner}: this VecNormalize normalises a dict observation; pass `key`, one of "
                f"{sorted(rms)}, got {key!r}"
            )
        return rms[key]
    if key is not None:
        raise ValueError(f"{owner}: `key` is for dict observations only, got {key!r}")
    return rms


def from_sb3(
    vec_normalize: Any, which: Literal["obs", "ret"] = "obs", *, key: str | None = None
) -> RunningNorm:
    """A :class:`~statplug.RunningNorm` holding a ``VecNormalize``'s statistics.

    ``which="obs"`` (default) reads ``obs_rms`` with ``epsilon`` and ``clip=clip_obs``: the
    normaliser then gives ``VecNormalize.normalize_obs``'s outputs. For a dict observation pass
    its ``key``. ``which="ret"`` reads ``ret_rms`` (the discounted returns' statistics) as a
    normaliser of shape ``(1,)`` with ``clip=clip_reward``; note that SB3 *scales* rewards by
    ``1 / sqrt(var + epsilon)`` without subtracting the mean
    (``reward / (norm.var + norm.eps).sqrt()``), whereas the normaliser's ``forward`` centres too.

    SB3's count starts at a prior of 1e-4 and reads ``n + 1e-4`` after ``n`` observations: it is
    rounded to ``n`` (mean and var are kept, so the outputs are the same). The result is in
    ``train()`` mode (each call updates it); call ``.eval()`` to only normalise.

    Example:
        >>> from stable_baselines3.common.env_util import make_vec_env   # doctest: +SKIP
        >>> from stable_baselines3.common.vec_env import VecNormalize    # doctest: +SKIP
        >>> venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=2))    # doctest: +SKIP
        >>> norm = from_sb3(venv).eval()                                  # doctest: +SKIP
    """
    vec = _vec_normalize("from_sb3", vec_normalize)
    rms = _rms("from_sb3", vec, which, key)
    clip = vec.clip_reward if which == "ret" else vec.clip_obs
    clip = None if clip is None or math.isinf(clip) else float(clip)
    return norm_from_rms(rms, eps=float(vec.epsilon), clip=clip)


def to_sb3(
    norm: RunningNorm,
    vec_normalize: Any,
    which: Literal["obs", "ret"] = "obs",
    *,
    key: str | None = None,
) -> None:
    """Write ``norm``'s statistics into a ``VecNormalize`` in place.

    ``which="obs"`` fills ``obs_rms`` (``obs_rms[key]`` for dict observations), ``clip_obs``
    (infinite when ``norm.clip`` is None) and ``epsilon``; ``which="ret"`` fills ``ret_rms``,
    ``clip_reward`` and ``epsilon`` (SB3 has one ``epsilon`` for both). The count is written
    as a float (SB3's type, exact up to 2**53); an empty normaliser writes SB3's fresh state.
    SB3 adds ``epsilon`` to the variance: a normaliser with ``eps_on="std"`` raises.
    """
    vec = _vec_normalize("to_sb3", vec_normalize)
    if not isinstance(norm, RunningNorm) or norm.eps_on != "var":
        got = f"eps_on={norm.eps_on!r}" if isinstance(norm, RunningNorm) else type(norm).__name__
        raise ValueError(
            f"to_sb3: `norm` must be a RunningNorm with eps_on='var' (SB3 normalises with "
            f"sqrt(var + epsilon)), got {got}"
        )
    fill_rms("to_sb3", norm, _rms("to_sb3", vec, which, key))
    clip = math.inf if norm.clip is None else norm.clip
    if which == "ret":
        vec.clip_reward = clip
    else:
        vec.clip_obs = clip
    vec.epsilon = norm.eps
