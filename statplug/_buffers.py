"""Shared machinery for modules that own non-trained buffers (stats, masks, encodings).

Two habits every statplug module shares, kept here once:

* **Pinned dtypes.** ``model.half()``, ``model.to(torch.bfloat16)``, Lightning's ``bf16-true`` and
  ``16-true`` precision all go through :meth:`torch.nn.Module._apply`. A pinned module lets the
  conversion move its floating buffers to the new device but keeps each buffer's dtype, because an
  accumulator or a phase table in half precision is silently wrong (a bf16 count stops at 256, a
  bf16 ``inv_freq`` is radians off at position 8k).
* **Demotions behind ``_apply``'s back fail loudly.** Some wrappers cast buffers by assigning
  ``buffer.data`` (torch FSDP's ``MixedPrecision(buffer_dtype=...)``), which no ``_apply`` sees.
  Each module records its floating buffers' dtypes when they are registered;
  :meth:`PinnedDtypeModule._check_pinned_dtypes` compares them (dtype attributes only, no tensor
  read) on the update path and raises before the state changes.
* **Versioned state.** An integer ``_version`` is written into the ``state_dict`` metadata by
  :class:`torch.nn.Module`; a class whose layout changes branches on the saved version in
  ``_load_from_state_dict``, as ``torch.nn.modules.batchnorm`` does.

It also holds what every layer above uses to find, name and compare that state:
:func:`named_statplug_modules`, the one walk over a model that finds its statplug modules (and
names them for messages), :func:`dtype_name`, and :func:`fingerprint`, the one summary of a
tensor's values that checks compare.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from statplug.errors import StatplugError

__all__ = [
    "FINGERPRINT_MAX_WEIGHT",
    "PinnedDtypeModule",
    "checked_int",
    "derived_device",
    "dtype_name",
    "fingerprint",
    "fingerprint_weights",
    "name_modules",
    "named_statplug_modules",
    "positive_int",
    "qualified_name",
]

M = TypeVar("M", bound=nn.Module)
# A prime: :func:`fingerprint`'s position weights are 1 .. FINGERPRINT_MAX_WEIGHT.
FINGERPRINT_MAX_WEIGHT = 65521


class PinnedDtypeModule(nn.Module):
    """An ``nn.Module`` whose own floating buffers keep their dtype under dtype conversions.

    Device moves (``.to(device)``, ``.cuda()``, ``to_empty``) apply as usual. Parameters and the
    buffers of child modules follow their own rules.

    Example:
        >>> import torch
        >>> from statplug import RunningMoments
        >>> m = RunningMoments(3).to(torch.bfloat16)
        >>> m.mean.dtype
        torch.float64
    """

    _version: int = 1
    # Set by statplug when it walks a model (sync, audit, StatsMixin), used in messages.
    _statplug_name: str | None = None
    # Dtype of each floating buffer at registration: {name: dtype}. Instance dicts, made on the
    # first registration (class-level None so that modules unpickled from before it still work).
    _pinned_dtypes: dict[str, torch.dtype] | None = None
    # One (name, dtype) per distinct pinned dtype: what the hot-path check compares.
    _dtype_sentinels: tuple[tuple[str, torch.dtype], ...] = ()

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self._pin_dtype(name, tensor)

    def _pin_dtype(self, name: str, tensor: Tensor | None) -> None:
        """Record ``tensor``'s dtype as buffer ``name``'s pinned dtype (floating tensors only).

        :meth:`register_buffer` calls it; code that writes ``self._buffers`` directly to register
        a buffer (``Stat.add_state``) must call it too.
        """
        if tensor is None or not tensor.is_floating_point():
            return
        pinned = self.__dict__.get("_pinned_dtypes")
        if pinned is None:
            pinned = self.__dict__["_pinned_dtypes"] = {}
        pinned[name] = tensor.dtype
        # A wrapper that casts buffers casts every floating buffer it manages to one dtype, so one
        # buffer per distinct dtype tells: a float64 accumulator cast to float32 is caught too.
        firsts: dict[torch.dtype, str] = {}
        for n, d in pinned.items():
            firsts.setdefault(d, n)
        self.__dict__["_dtype_sentinels"] = tuple((n, d) for d, n in firsts.items())

    def _check_pinned_dtypes(self) -> None:
        """Raise :class:`~statplug.errors.StatplugError` if a floating buffer lost its pinned dtype.

        Cheap enough for every update (a few dtype attribute comparisons, no tensor read, no
        device work). Call it first on every path that changes or uses the state (``update``,
        a normaliser's ``forward``), so a demoted module fails before anything changes.
        """
        bufs = self._buffers
        for name, dtype in self._dtype_sentinels:
            buf = bufs.get(name)
            if buf is not None and buf.dtype is not dtype:
                self._raise_demoted()

    def demoted_buffers(self) -> list[tuple[str, torch.dtype, torch.dtype]]:
        """``(name, pinned dtype, current dtype)`` of every own buffer whose dtype was changed
        behind :meth:`_apply`'s back (e.g. by ``buffer.data = buffer.to(torch.bfloat16)``)."""
        out = []
        for name, dtype in (self._pinned_dtypes or {}).items():
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype is not dtype:
                out.append((name, dtype, buf.dtype))
        return out

    def _raise_demoted(self) -> None:
        bad = self.demoted_buffers()
        listed = ", ".join(f"`{n}` is {got} (pinned {want})" for n, want, got in bad[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise StatplugError(
            f"{self.stat_name}: buffer dtypes were changed behind statplug's dtype pinning: "
            f"{listed}{more}. Something replaced them without `.to()` (torch FSDP's "
            "`MixedPrecision(buffer_dtype=...)` assigns `buffer.data` at its first forward, "
            "state_dict or load), so the values may already be rounded; the module was left "
            "unchanged. Fix: "
            "call `statplug.exclude_from_fsdp_buffer_cast(model)` right after wrapping the model "
            "in FSDP and before its first forward, state_dict or load (Lightning: add the "
            "`SyncStats` callback), or wrap with a policy whose `buffer_dtype` is None"
        )

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
        """The qualified name inside the model when statplug has seen it, else the class name.

        :func:`named_statplug_modules` sets it; set it yourself for a module that lives outside
        any model (None goes back to the class name).
        """
        return qualified_name(self)

    @stat_name.setter
    def stat_name(self, name: str | None) -> None:
        self._statplug_name = name or None

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
        # Masks and encodings are at version 1, their first layout: nothing to migrate. A layout
        # change bumps `_version` and branches on the saved one, as Stat._load_from_state_dict.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._after_load(local_metadata)

    def _after_load(self, local_metadata: dict[str, Any]) -> None:
        """Refresh derived or hidden state after buffers were loaded (``local_metadata``: the
        load's metadata, e.g. whether it assigned tensors, for :func:`derived_device`)."""


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


def named_statplug_modules(root: nn.Module, kind: type[M]) -> list[tuple[str, M]]:
    """Every statplug module of class ``kind`` inside ``root``, with its qualified name.

    The one walk that finds a model's statplug state (``kind``: ``Stat`` for the stats,
    :class:`PinnedDtypeModule` for stats, normalisers, masks and encodings): sync, audit,
    ``StatsMixin`` and the callbacks all go through it, so none keeps a registry to forget. In
    ``named_modules()`` order, ``root`` itself first (named ``""``) when it is one. On the way it
    records every statplug module's qualified name for messages
    (:attr:`~PinnedDtypeModule.stat_name`).

    Example:
        >>> from torch import nn
        >>> from statplug import RunningNorm, Stat
        >>> model = nn.Sequential(nn.Linear(2, 2), RunningNorm(2))
        >>> [(name, type(s).__name__) for name, s in named_statplug_modules(model, Stat)]
        [('1.moments', 'RunningMoments')]
        >>> model[1].moments.stat_name
        '1.moments'
    """
    found: list[tuple[str, M]] = []
    for name, mod in root.named_modules():
        if isinstance(mod, PinnedDtypeModule):
            # A plain string: written to __dict__ only when it changes (every sync walks the
            # model; nn.Module.__setattr__ costs ~1 us a module).
            if name and mod.__dict__.get("_statplug_name") != name:
                mod.__dict__["_statplug_name"] = name
            if isinstance(mod, kind):
                found.append((name, mod))
    return found


def name_modules(root: nn.Module) -> list[PinnedDtypeModule]:
    """The statplug modules of ``root`` (see :func:`named_statplug_modules`), without names."""
    return [mod for _, mod in named_statplug_modules(root, PinnedDtypeModule)]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how statplug writes a dtype in files and tables."""
    return str(dtype).removeprefix("torch.")


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


def fingerprint_weights(n: int, device: torch.device | str = "cpu") -> Tensor:
    """:func:`fingerprint`'s position weights for ``n`` elements: integers from a quadratic hash
    of the position (a linear one cannot tell ``[1, 0, 0, 1]`` from ``[0, 1, 1, 0]``), float64.
    Callers that fingerprint same-sized tensors repeatedly keep them."""
    m = FINGERPRINT_MAX_WEIGHT
    i = torch.arange(n, dtype=torch.int64, device=device).remainder_(m)
    return (i * i % m * 40503 + i * 9973).remainder_(m).add_(1).to(torch.float64)


_BIT_VIEWS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def fingerprint(t: Tensor, weights: Tensor | None = None, *, exact: bool = False) -> Tensor:
    """Float64 ``[6]`` summary of ``t`` on its device: sums of x, |x|, w*x; #nan, #+inf, #-inf.

    Non-finite values are counted apart, so the sums stay finite. The weights ``w``
    (:func:`fingerprint_weights`, or ``weights`` when given) make a permutation visible, and for
    bool and integer tensors every sum is an exact integer, whatever the summation order. Float
    sums depend on the order (the thread count), so the audit compares them with a relative
    slack.

    With ``exact``: float64 ``[4]``, the plain and the position-weighted sums of the values' bit
    patterns in wrapping int64 arithmetic, each as two float64-exact halves. Equal for equal
    bits whatever the summation order: what ranks compare when they must agree bit for bit (a
    sync's agreed state).
    """
    if exact:
        return _bit_fingerprint(t, weights)
    f64 = torch.float64
    x = t.detach().reshape(-1).to(f64)
    s = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    w = fingerprint_weights(x.numel(), x.device) if weights is None else weights
    return torch.stack(
        (
            s.sum(),
            s.abs().sum(),
            torch.dot(s, w),
            torch.isnan(x).sum().to(f64),
            (x == torch.inf).sum().to(f64),
            (x == -torch.inf).sum().to(f64),
        )
    )


def _bit_fingerprint(t: Tensor, weights: Tensor | None) -> Tensor:
    x = t.detach().reshape(-1)
    if x.dtype is torch.bool or not (x.is_floating_point() or x.is_complex()):
        bits = x.to(torch.int64)
    else:
        bits = x.contiguous().view(_BIT_VIEWS[x.element_size()]).to(torch.int64)
    w = fingerprint_weights(x.numel(), x.device) if weights is None else weights
    sums = torch.stack((bits.sum(), (bits * w.to(torch.int64)).sum()))
    return torch.cat((sums >> 32, sums & 0xFFFFFFFF)).to(torch.float64)
