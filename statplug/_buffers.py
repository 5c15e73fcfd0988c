"""Shared machinery for modules that own non-trained buffers (stats, masks, encodings).

Two habits every statplug module shares, kept here once:

* **Pinned dtypes.** ``model.half()``, ``model.to(torch.bfloat16)``, Lightning's ``bf16-true`` and
  ``16-true`` precision all go through :meth:`torch.nn.Module._apply`. A pinned module lets the
  conversion move its floating buffers to the new device but keeps each buffer's dtype, because an
  accumulator or a phase table in half precision is silently wrong (a bf16 count stops at 256, a
  bf16 ``inv_freq`` is radians off at position 8k).
* **Versioned state.** An integer ``_version`` is written into the ``state_dict`` metadata by
  :class:`torch.nn.Module`; :meth:`_migrate_state_dict` upgrades older layouts before loading, as
  ``torch.nn.modules.batchnorm`` does.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PinnedDtypeModule",
    "checked_int",
    "derived_device",
    "positive_int",
    "qualified_name",
]


class PinnedDtypeModule(nn.Module):
    """An ``nn.Module`` whose own floating buffers keep their dtype under dtype conversions.

    Device moves (``.to(device)``, ``.cuda()``, ``to_empty``) apply as usual. Parameters and the
    buffers of child modules follow their own rules.

    Example:
        >>> import torch
        >>> from statplug import RunningMoments
        >>> m = RunningMoments(3).to(torch.bfloat16)
        >>> m.mean.dtype
        torch.float32
    """

    _version: int = 1
    # Set by statplug when it walks a model (sync, audit, StatsMixin), used in messages.
    _statplug_name: str | None = None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        pinned = {
            id(buf): buf.dtype
            for buf in self._buffers.values()
            if buf is not None and buf.is_floating_point()
        }
        if not pinned:
            return super()._apply(fn, recurse)

        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)
            dtype = pinned.get(id(t))
            if dtype is not None and out.dtype != dtype:
                # Convert from the original, not from the lossy result of ``fn``.
                out = t.to(device=out.device, dtype=dtype)
            return out

        return super()._apply(keep_dtype, recurse)

    @property
    def stat_name(self) -> str:
        """The qualified name inside the model when statplug has seen it, else the class name."""
        return qualified_name(self)

    def _migrate_state_dict(
        self, state_dict: dict[str, Any], prefix: str, version: int | None
    ) -> None:
        """Upgrade ``state_dict`` entries under ``prefix`` saved at ``version`` (None: unknown)."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._migrate_state_dict(state_dict, prefix, local_metadata.get("version"))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._after_load()

    def _after_load(self) -> None:
        """Refresh derived or hidden state after buffers were loaded in place."""


def derived_device(buffer: Tensor, local_metadata: dict[str, Any]) -> torch.device:
    """Where a load rebuilds a derived (never saved) buffer that now lives on ``buffer``'s
    device: there, except on the meta device after ``load_state_dict(..., assign=True)`` -- a
    model built on meta and materialised by the load, whose saved tensors say nothing about a
    module without saved state -- where it is the CPU, like the checkpoint tensors torch loads."""
    if buffer.device.type == "meta" and local_metadata.get("assign_to_params_buffers"):
        return torch.device("cpu")
    return buffer.device


def qualified_name(module: nn.Module) -> str:
    """The name statplug uses for ``module`` in messages."""
    name = getattr(module, "_statplug_name", None)
    return name or type(module).__name__


def name_modules(root: nn.Module) -> list[PinnedDtypeModule]:
    """Record each statplug module's qualified name inside ``root`` for use in messages.

    Returns those modules (``root`` included when it is one) in ``named_modules()`` order.
    """
    found = []
    for name, mod in root.named_modules():
        if isinstance(mod, PinnedDtypeModule):
            if name:
                mod._statplug_name = name
            found.append(mod)
    return found


def checked_int(
    name: str, value: Any, low: int, high: int | None = None, expected: str = "a positive int"
) -> int:
    """``value`` as an int in ``[low, high]``, or ``ValueError`` naming the argument ``name``,
    what it must be (``expected``) and what was received. Bools are refused."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be {expected} (got {value!r})")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be {expected} (got {value!r})") from None
    if out < low or (high is not None and out > high):
        raise ValueError(f"`{name}` must be {expected} (got {out})")
    return out


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or ``ValueError`` naming the argument ``name`` and what was
    received."""
    return checked_int(name, value, 1)
