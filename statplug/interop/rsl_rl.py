"""rsl_rl's ``EmpiricalNormalization`` to and from :class:`~statplug.RunningNorm`."""

from __future__ import annotations

from typing import Any

import torch

from statplug._extras import require
from statplug.stats.norm import RunningNorm

__all__ = ["from_rsl_rl", "to_rsl_rl"]


def _empirical(owner: str, obj: Any) -> Any:
    require("rsl_rl", f"statplug.interop.{owner}")
    from rsl_rl.modules import EmpiricalNormalization

    if not isinstance(obj, EmpiricalNormalization):
        raise ValueError(
            f"{owner}: `empirical_normalization` must be an rsl_rl EmpiricalNormalization, got "
            f"{type(obj).__name__}; to read a checkpoint, load its state dict into one first"
        )
    return obj


def from_rsl_rl(empirical_normalization: Any) -> RunningNorm:
    """A :class:`~statplug.RunningNorm` holding an rsl_rl ``EmpiricalNormalization``'s state.

    rsl_rl normalises with ``(x - mean) / (std + eps)`` (eps 1e-2 by default): the normaliser
    gets ``eps_on="std"`` and its ``eps``, so it gives the same outputs while holding the exact
    moments (``count`` exactly, ``mean``, ``m2 = var * count`` in float64). A module that has
    stopped learning (``until`` reached) comes back frozen; ``until`` itself is not kept. An
    empty module (count 0) gives an empty normaliser, which returns its input until it has seen
    two samples (rsl_rl's divides by ``1 + eps`` then). The result is in ``train()`` mode; call
    ``.eval()`` to only normalise.

    Example:
        >>> from rsl_rl.modules import EmpiricalNormalization            # doctest: +SKIP
        >>> norm = from_rsl_rl(EmpiricalNormalization(48)).eval()        # doctest: +SKIP
    """
    en = _empirical("from_rsl_rl", empirical_normalization)
    count = int(en.count)
    norm = RunningNorm.from_moments(
        en._mean.detach().squeeze(0), en._var.detach().squeeze(0), count, eps=float(en.eps),
        eps_on="std",
    )
    if en.until is not None and count >= en.until:
        norm.freeze()
    return norm


def to_rsl_rl(norm: RunningNorm, empirical_normalization: Any) -> None:
    """Write ``norm``'s statistics into an rsl_rl ``EmpiricalNormalization`` in place: its
    buffers ``_mean``, ``_var``, ``_std`` (in their dtype and device), ``count`` and its ``eps``.

    ``_std`` is ``sqrt(_var)`` as rsl_rl computes it. An empty normaliser writes rsl_rl's fresh
    state (mean 0, var 1, count 0). rsl_rl adds ``eps`` to the std and never clips: a normaliser
    with ``eps_on="var"`` or a ``clip`` raises ``ValueError``.
    """
    en = _empirical("to_rsl_rl", empirical_normalization)
    if not isinstance(norm, RunningNorm) or norm.eps_on != "std" or norm.clip is not None:
        raise ValueError(
            f"to_rsl_rl: rsl_rl normalises with (x - mean) / (std + eps) and does not clip: "
            f"`norm` must be a RunningNorm with eps_on='std' and clip=None, got {norm!r}; "
            f"build it with RunningNorm(..., eps_on='std', eps=1e-2)"
        )
    shape = tuple(en._mean.shape[1:])
    if shape != norm.moments.shape:
        raise ValueError(
            f"to_rsl_rl: the normaliser's shape {norm.moments.shape} does not match the "
            f"EmpiricalNormalization's {shape}; pass one built for that shape"
        )
    n = int(norm.count)
    with torch.no_grad():
        if n == 0:
            en._mean.zero_()
            en._var.fill_(1.0)
        else:
            en._mean.copy_(norm.mean.reshape(en._mean.shape))
            en._var.copy_(norm.var.reshape(en._var.shape))
        en._std.copy_(en._var.sqrt())
        en.count.fill_(n)
    en.eps = norm.eps
