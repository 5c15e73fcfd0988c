"""The ``RunningMeanStd`` layout gymnasium and stable-baselines3 share: ``mean``, ``var`` (numpy,
population variance) and a float ``count`` that starts at a prior of 1e-4 (mean 0, var 1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from statplug.stats.norm import RunningNorm

# The state a fresh RunningMeanStd holds (gymnasium's and SB3's default `epsilon` argument).
PRIOR_COUNT = 1e-4


def is_running_mean_std(obj: Any) -> bool:
    return all(hasattr(obj, name) for name in ("mean", "var", "count")) and not isinstance(
        obj, torch.nn.Module
    )


def norm_from_rms(rms: Any, *, eps: float, clip: float | None) -> RunningNorm:
    """A :class:`RunningNorm` holding ``rms``'s moments (its count rounded to an integer)."""
    return RunningNorm.from_moments(
        np.asarray(rms.mean), np.asarray(rms.var), rms.count, eps=eps, clip=clip
    )


def fill_rms(owner: str, norm: RunningNorm, rms: Any) -> None:
    """Write ``norm``'s moments into ``rms`` in place, in ``rms``'s dtype and shape.

    The count is written as a float, exact up to 2**53 samples; an empty normaliser writes the
    libraries' fresh state (count 1e-4, mean 0, var 1).
    """
    if not isinstance(norm, RunningNorm):
        raise ValueError(
            f"{owner}: `norm` must be a statplug RunningNorm, got {type(norm).__name__}"
        )
    old = np.asarray(rms.mean)
    shape = norm.moments.shape
    if old.shape != shape and not (old.shape == () and shape == (1,)):
        raise ValueError(
            f"{owner}: the normaliser's shape {shape} does not match the target's statistics "
            f"{old.shape}; pass a target built for observations of shape {shape}"
        )
    dtype = old.dtype if np.issubdtype(old.dtype, np.floating) else np.float64
    n = int(norm.count)
    if n == 0:
        rms.mean = np.zeros(old.shape, dtype=dtype)
        rms.var = np.ones(old.shape, dtype=dtype)
        rms.count = PRIOR_COUNT
        return
    rms.mean = numpy_of(norm.mean).reshape(old.shape).astype(dtype)
    rms.var = numpy_of(norm.var).reshape(old.shape).astype(dtype)
    rms.count = float(n)


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().copy()
