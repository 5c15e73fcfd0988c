"""The :class:`Stat` base: declared, mergeable, dtype-pinned state held in buffers.

A stat declares each piece of its state once, in ``__init__``, with :meth:`Stat.add_state`: its
default, how it merges across ranks (``reduce``), and whether the sync keeps an *agreed* copy of
it (a hidden ``_agreed_<name>`` buffer: the value every rank held at the last sync or load, from
which a sync tells this rank's new data apart, so nothing is counted twice). Every piece is a
registered buffer, so it is saved in ``state_dict``, moved by ``.to()`` and never seen by an
optimizer; the saved buffers are current after every call.

An update is: check the input (:meth:`Stat._rows`), compute the batch's statistics in one pass,
apply the nan policy (:meth:`Stat._nan_check`), merge into the buffers in place.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor

from statplug._buffers import PinnedDtypeModule
from statplug._compat import copy_all_
from statplug.errors import CheckpointMismatchError
from statplug.stats.merge import Moments, host_reads_free

__all__ = [
    "NanPolicy",
    "Reduce",
    "Stat",
    "StatBatch",
    "StateSummary",
    "flat_cat",
    "real_number",
    "state_lock",
]

NanPolicy = Literal["raise", "skip", "propagate"]
Reduce = Literal["sum", "min", "max", "moments"]
_NAN_POLICIES = ("raise", "skip", "propagate")
_REDUCES = ("sum", "min", "max", "moments", None)
_ACCUMULATOR_DTYPES = (torch.float32, torch.float64)
AGREED = "_agreed_"

# One lock for every stat's read-merge-write: an update lands whole, before or after a
# concurrent update or sync on another thread. Uncontended it costs ~0.1 us.
_LOCK = threading.RLock()


def state_lock() -> contextlib.AbstractContextManager[Any]:
    """The lock every update and sync holds (nothing under ``torch.compile``, which traces)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _LOCK


def _as_shape(shape: int | Sequence[int], owner: str) -> tuple[int, ...]:
    if isinstance(shape, bool) or isinstance(shape, (str, bytes)):
        raise ValueError(f"{owner}: `shape` must be an int or a tuple of ints, got {shape!r}")
    if isinstance(shape, int):
        shape = (shape,)
    try:
        out = tuple(operator.index(s) for s in shape)
    except TypeError as err:
        raise ValueError(
            f"{owner}: `shape` must be an int or a tuple of ints, got {shape!r}"
        ) from err
    if any(isinstance(s, bool) for s in shape) or not out or any(s <= 0 for s in out):
        raise ValueError(f"{owner}: `shape` must have positive int sizes, got {shape!r}")
    return out


def real_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    expected: str,
) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``), or one
    ``ValueError`` naming ``owner``'s argument ``name``, what it must be and what arrived.
    Bools, strings, None and NaN are refused; so is an infinity outside the range."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    if (
        not ok
        or math.isnan(number)
        or number > high
        or number < low
        or (low_open and number == low)
    ):
        raise ValueError(f"{owner}: `{name}` must be {expected}, got {value!r}")
    return number


def _device_arg(device: Any, owner: str) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            f"{owner}: `device` must be a torch.device or a device string such as 'cpu', "
            f"got {device!r}"
        ) from err


@dataclass(frozen=True)
class StateSummary:
    """A saved state of a stat, read back through its own class (:meth:`Stat.summarize_state`).

    Attributes:
        kind: the class name (``"RunningMoments"``).
        keys: the state's keys (without prefix), the saved bookkeeping ones included.
        shape: the feature shape.
        dtype: the saved accumulator dtype.
        count: samples seen; ``n_skipped``: rows skipped; ``frozen``: saved frozen.
        features: per-feature read-outs, flat float64 (``mean`` and ``std`` of moments, ``min``
            and ``max`` of extremes).
        scalars: the stat's other saved numbers (``weight`` of :class:`EMAMoments`).
    """

    kind: str
    keys: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    count: int
    n_skipped: int
    frozen: bool
    features: dict[str, Tensor]
    scalars: dict[str, float]


class _NotFinite(Exception):
    """A batch whose statistics are not finite, under the skip policy on the host."""


class Stat(PinnedDtypeModule):
    """Base class of every running statistic.

    Subclasses declare their state with :meth:`add_state` and implement ``update``, the merge
    hook :meth:`_merge_from`, and -- for moment stats -- the sync hooks :meth:`sync_new_data`
    and :meth:`sync_absorb`. The base owns argument checks, the nan policy, freezing, the int64
    ``count``, loading, and the agreed state.

    Args:
        shape: feature shape; every leading dim of an update is a sample dim.
        accumulator_dtype: dtype of the floating state and the read-outs, ``torch.float32`` or
            ``torch.float64``. It survives ``.half()``, ``.to(torch.bfloat16)`` and precision
            plugins. Default: ``torch.float64``.
        nan_policy: ``"raise"`` (``ValueError``, stat unchanged: at once on the CPU; on an
            accelerator or under ``torch.compile`` the bad batch is left out on the device and
            the error is raised at the next sync, ``state_dict`` or :meth:`check`), ``"skip"``
            (rows with a non-finite value are dropped and counted in ``n_skipped``) or
            ``"propagate"``. Default: ``"raise"``.
        device: where to create the buffers. Default: the default device.
    """

    _version = 1
    count: Tensor
    n_skipped: Tensor
    frozen_flag: Tensor
    # Per-feature read-outs a summary of the saved state reports (see `summarize_state`).
    _summary_features: tuple[str, ...] = ("mean", "std")
    # reset()'s fill values: CPU constants, configuration like `shape` (not state).
    _statplug_unregistered_ok = ("_defaults",)

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        accumulator_dtype: torch.dtype = torch.float64,
        nan_policy: NanPolicy = "raise",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.shape = _as_shape(shape, name)
        if accumulator_dtype not in _ACCUMULATOR_DTYPES:
            raise ValueError(
                f"{name}: `accumulator_dtype` must be torch.float32 or torch.float64, got "
                f"{accumulator_dtype!r}; low precision accumulators silently stop growing"
            )
        if not isinstance(nan_policy, str) or nan_policy not in _NAN_POLICIES:
            raise ValueError(
                f"{name}: `nan_policy` must be one of {_NAN_POLICIES}, got {nan_policy!r}"
            )
        self.accumulator_dtype = accumulator_dtype
        self.nan_policy: NanPolicy = nan_policy
        self.n_features = math.prod(self.shape)
        self._device = _device_arg(device, name)
        self._reduces: dict[str, str | None] = {}
        self._defaults: dict[str, Tensor] = {}  # what reset() fills each state with
        # Frozen-ness is configuration, like `training` (an update returns without touching the
        # device), and saved in `frozen_flag`, which every load reads back.
        self._frozen = False
        zero = torch.zeros((), dtype=torch.int64, device="cpu")
        self.add_state("count", zero, reduce="sum", agreed=True)
        self.add_state("n_skipped", zero.clone(), reduce="sum", agreed=True)
        self.add_state("frozen_flag", zero.to(torch.bool))
        # Batches the raise policy left out on the device, reported at the next host read.
        self.add_state("_refused", zero.clone(), persistent=False)

    # ----------------------------------------------------------------------------- declaration
    def add_state(
        self,
        name: str,
        default: Tensor,
        *,
        reduce: Reduce | None = None,
        agreed: bool = False,
        persistent: bool = True,
    ) -> None:
        """Register ``default`` (a CPU tensor filled with what :meth:`reset` fills in) as
        buffer ``name`` on the stat's device, merged across ranks by ``reduce``.

        ``reduce``: ``"sum"`` (only what was added since the agreed state travels), ``"min"``,
        ``"max"``, ``"moments"`` (merged with Chan's formula through :meth:`sync_new_data`) or
        None (not synced: configuration such as ``frozen_flag``). ``agreed`` also registers the
        hidden ``_agreed_<name>``; ``persistent=False`` keeps the buffer out of ``state_dict``.
        """
        owner = f"{type(self).__name__}.add_state({name!r})"
        if reduce not in _REDUCES:
            raise ValueError(f"{owner}: `reduce` must be one of {_REDUCES}, got {reduce!r}")
        if default.is_floating_point() and default.dtype not in _ACCUMULATOR_DTYPES:
            raise ValueError(
                f"{owner}: floating state must be float32 or float64, got {default.dtype}"
            )
        if default.device.type != "cpu":
            raise ValueError(
                f"{owner}: `default` must be a CPU tensor (filled with what reset() fills in), "
                f"got one on {default.device}"
            )
        # Placed where the stat is built: `device`, else the default device (meta included).
        on_device = default.to(self._device or torch.get_default_device())
        self.register_buffer(name, on_device, persistent=persistent)
        self._reduces[name] = reduce
        # What reset() fills in: the default's first value, kept as a 0-dim CPU tensor (no
        # host read here: stats are also built inside forward hooks on accelerators).
        self._defaults[name] = default.reshape(-1)[0].clone() if default.numel() else default.sum()
        if agreed:
            self.register_buffer(AGREED + name, on_device.clone(), persistent=False)

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the declared state buffers that sync."""
        return tuple(n for n, r in self._reduces.items() if r is not None)

    def agreed_names(self) -> list[str]:
        """Names of the declared states that keep an agreed copy."""
        return [n for n in self._reduces if AGREED + n in self._buffers]

    def state(self, name: str) -> Tensor:
        """The buffer of state ``name`` (``stat.state("mean")`` is ``stat.mean``, found faster)."""
        return cast(Tensor, self._buffers[name])

    def flat(self, name: str) -> Tensor:
        """State ``name`` as a flat tensor sharing its memory (the buffer itself when 1-D)."""
        buf = cast(Tensor, self._buffers[name])
        return buf if buf.dim() == 1 else buf.view(-1)

    def agreed(self, name: str) -> Tensor:
        """The agreed copy of state ``name`` (what every rank held at the last sync or load)."""
        buf = self._buffers[AGREED + name]
        assert buf is not None
        return buf

    # ----------------------------------------------------------------------------- update path
    def _rows(
        self, x: Any, mask: Tensor | None = None, weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None] | None:
        """Validate ``x`` (and ``mask``/``weight``) and view it as ``[n_samples, n_features]`` in
        a float dtype the kernels take, with one weight per row (None: every row counts once).
        None when there is nothing to do (frozen, or no samples)."""
        self._check_pinned_dtypes()  # a wrapper's `buffer.data` cast: raise before any change
        self._check_input(x)
        w = self._row_weights(x, mask, weight)
        if self._frozen or x.numel() == 0:
            return None
        x = x.detach()  # never build a graph through the stat
        if not x.is_floating_point():
            x = x.to(self.accumulator_dtype)
        elif x.dtype not in _ACCUMULATOR_DTYPES:  # float16, bfloat16, float8: no kernels
            x = x.float()
        rows = x if x.dim() == 2 and len(self.shape) == 1 else x.reshape(-1, self.n_features)
        if w is not None and w.dtype is torch.bool and host_reads_free(w):
            rows = _select(rows, w)  # on the CPU a mask selects its rows (no weights)
            return (rows, None) if rows.shape[0] else None
        return rows, None if w is None else w.to(rows.dtype)

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{self.stat_name}.update: expected a torch.Tensor, got {type(x).__name__}"
            )
        k = len(self.shape)
        if x.dim() < k or x.shape[x.dim() - k :] != self.shape:
            raise ValueError(
                f"{self.stat_name}: expected input whose trailing shape is {self.shape} "
                f"(got shape {tuple(x.shape)}); leading dims are samples"
            )
        if x.layout is not torch.strided:
            raise TypeError(
                f"{self.stat_name}.update: expected a dense (strided) tensor, got layout "
                f"{x.layout}; convert it first (e.g. x.to_dense())"
            )
        if x.is_complex() or x.dtype is torch.bool:
            raise TypeError(
                f"{self.stat_name}.update: expected real numbers, got a {x.dtype} tensor; "
                "convert it first (e.g. x.real or x.float())"
            )
        if x.is_meta:
            raise ValueError(
                f"{self.stat_name}.update: got a meta tensor (no data); materialise the input "
                "(and the stat, with to_empty() and reset_parameters()) first"
            )

    def _row_weights(self, x: Tensor, mask: Any, weight: Any) -> Tensor | None:
        """One flat weight per sample row from ``mask`` (bool: True keeps a row) and ``weight``
        (>= 0, finite), each shaped like ``x``'s sample dims; a bool tensor when only a mask
        was given. Bad values raise at once on the CPU; elsewhere they empty the batch and are
        reported like the raise policy's refused batches (see :meth:`check`)."""
        if mask is None and weight is None:
            return None
        samples = tuple(x.shape[: x.dim() - len(self.shape)])
        for arg, value, kind in (("mask", mask, "bool"), ("weight", weight, "floating")):
            if value is None:
                continue
            if not isinstance(value, Tensor):
                got = type(value).__name__
            elif (value.dtype is torch.bool) != (kind == "bool") or value.is_complex() or (
                kind == "floating" and not value.is_floating_point()
            ) or tuple(value.shape) != samples or value.device != x.device:
                got = f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
            else:
                continue
            raise ValueError(
                f"{self.stat_name}.update: `{arg}` must be a {kind} tensor of the sample shape "
                f"{samples} on {x.device} (the input's leading dims), got {got}"
            )
        keep = None if mask is None else mask.reshape(-1)
        if weight is None:
            return keep
        w = weight.detach().reshape(-1)
        valid = torch.isfinite(w).all() & (w >= 0).all()
        if host_reads_free(w):
            if not bool(valid):
                raise ValueError(
                    f"{self.stat_name}.update: `weight` must be finite and >= 0, got a weight "
                    f"of {w[~(torch.isfinite(w) & (w >= 0))][0].item()!r}; the stat is unchanged"
                )
        else:
            refused = self._buffers["_refused"]
            assert refused is not None
            refused.add_(~valid)
            w = torch.where(valid, w, 0.0)
        return w if keep is None else torch.where(keep, w, 0.0)

    def _skip(
        self, rows: Tensor, weight: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | int]:
        """The rows and weights without the rows holding a NaN or Inf, and how many rows that
        leaves out (rows a mask or weight already left out are not counted): selected on the
        CPU, given weight 0 elsewhere (decided on the device)."""
        keep = torch.isfinite(rows).all(dim=1)
        if weight is not None:
            return rows, torch.where(keep, weight, 0.0), ((weight > 0) & ~keep).sum()
        if host_reads_free(rows):
            return _select(rows, keep), None, rows.shape[0] - int(keep.sum())
        return rows, keep.to(rows.dtype), rows.shape[0] - keep.sum()

    @staticmethod
    def _rows_counted(rows: Tensor, weight: Tensor | None) -> Tensor | int:
        """How many rows ``count`` gains: those of positive weight."""
        return rows.shape[0] if weight is None else (weight > 0).sum()

    def _nan_check(self, finite: Callable[[], Tensor | bool]) -> Tensor | None:
        """Apply the nan policy to a batch whose statistics are ``finite()`` (True, or a 0-dim
        bool tensor; not asked under "propagate"). Raise policy on the CPU: raise now;
        elsewhere: count the batch in ``_refused`` and return the flag, which the caller uses to
        leave the batch out. Skip policy on the CPU: signal :meth:`update` to drop the bad rows
        and try again (elsewhere they were given weight 0 before). None: nothing to leave out.
        Every ``_absorb`` calls it before it writes any state."""
        if self.nan_policy == "propagate":
            return None
        refused = self._buffers["_refused"]
        assert refused is not None
        if self.nan_policy == "skip":
            # On the host the skip policy looks for bad rows only in a batch found not finite.
            if host_reads_free(refused) and not bool(finite()):
                raise _NotFinite
            return None
        ok = finite()
        if ok is True:
            return None
        if host_reads_free(refused):
            if not bool(ok):
                self._raise_non_finite(1)
            return None
        assert isinstance(ok, Tensor)
        refused.add_(~ok)
        return ok

    def _raise_too_large(self) -> None:
        acc = self.accumulator_dtype
        fix = "" if acc is torch.float64 else "; build it with accumulator_dtype=torch.float64"
        raise ValueError(
            f"{self.stat_name}: the statistics of these finite values are too large for a {acc} "
            f"accumulator{fix}; the stat is unchanged"
        )

    def check(self) -> Stat:
        """Raise the raise policy's error now if a batch was left out on the device since the
        last check (a sync and ``state_dict`` call this); returns ``self``."""
        refused = self._buffers["_refused"]
        if refused is not None and refused.device.type != "meta":
            n = int(refused)
            if n:
                refused.zero_()
                self._raise_non_finite(n)
        return self

    def _raise_non_finite(self, n_batches: int) -> None:
        what = "input contains" if n_batches == 1 else f"{n_batches} batches contained"
        acc = self.accumulator_dtype
        too_large = (
            "" if acc is torch.float64 else f" (or values too large for a {acc} accumulator: "
            "build the stat with accumulator_dtype=torch.float64)"
        )
        raise ValueError(
            f"{self.stat_name}: {what} NaN or Inf{too_large} and nan_policy='raise'; the stat "
            "was left unchanged by them. Use nan_policy='skip' to drop such rows or "
            "'propagate' to keep them"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Update in training mode; return ``x`` unchanged (a stat can sit in a Sequential)."""
        if self.training:
            self.update(x)
        return x

    def update(
        self, x: Tensor, mask: Tensor | None = None, weight: Tensor | None = None
    ) -> None:
        """Add the samples in ``x`` (shape ``[..., *shape]``) to the statistic.

        One pass over ``x`` and a few ``shape``-sized ops; never builds a graph.

        Args:
            x: samples; every leading dim is a sample dim.
            mask: bool, shaped like ``x``'s sample dims (``[B, T]`` for ``x`` ``[B, T, F]``):
                True keeps a row (the inverse of ``key_padding_mask``). Default: None.
            weight: non-negative floats shaped like the sample dims (integer weights equal
                repeated rows). Default: None.
        """
        got = self._rows(x, mask, weight)
        if got is None:
            return
        rows, w = got
        with state_lock(), torch.no_grad():
            skipped: Tensor | int = 0
            if self.nan_policy == "skip" and not host_reads_free(rows):
                rows, w, skipped = self._skip(rows, w)
            try:
                self._absorb(rows, w, self._rows_counted(rows, w))
            except _NotFinite:  # the skip policy on the host, for a batch with a NaN or Inf
                rows, w, skipped = self._skip(rows, w)
                if rows.shape[0]:  # every row skipped: nothing to merge
                    try:
                        self._absorb(rows, w, self._rows_counted(rows, w))
                    except _NotFinite:  # finite rows whose statistics overflow the state
                        self._raise_too_large()
            if self.nan_policy == "skip":  # after the merge: a batch refused changes nothing
                self.state("n_skipped").add_(skipped)

    def _absorb(self, rows: Tensor, weight: Tensor | None, n_rows: Tensor | int) -> None:
        """Merge the ``[n, F]`` ``rows`` (``n_rows`` of positive ``weight``) into the state."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- lifecycle
    def freeze(self) -> Stat:
        """Make :meth:`update` a no-op until :meth:`unfreeze`; saved with the state."""
        self._frozen = True
        self.frozen_flag.fill_(True)
        return self

    def unfreeze(self) -> Stat:
        """Let :meth:`update` change the statistic again."""
        self._frozen = False
        self.frozen_flag.fill_(False)
        return self

    @property
    def frozen(self) -> bool:
        return self._frozen

    def reset(self) -> None:
        """Forget every sample (keeps frozen-ness, dtype and device)."""
        with state_lock(), torch.no_grad():
            for name, reduce in self._reduces.items():
                buf = self._buffers[name]
                if buf is not None and (reduce is not None or name == "_refused"):
                    buf.fill_(self._defaults[name])
            self.settle_()

    def reset_parameters(self) -> None:
        """Same as :meth:`reset`, and unfrozen: the meta-device flow (``to_empty()`` then
        ``reset_parameters()``) leaves an empty, valid stat instead of uninitialised memory."""
        self.unfreeze()
        self.reset()

    def merge_(self, other: Stat) -> Stat:
        """Merge ``other`` (same class and shape) into this stat, exactly; returns ``self``.

        The merged samples count as this rank's new data at the next sync.
        """
        if type(other) is not type(self) or other.shape != self.shape:
            raise ValueError(
                f"{self.stat_name}.merge_: expected a {type(self).__name__} of shape {self.shape}, "
                f"got {type(other).__name__} of shape {getattr(other, 'shape', None)}"
            )
        with state_lock(), torch.no_grad():
            self._merge_from(other)
            self.count.add_(other.count)
            self.n_skipped.add_(other.n_skipped)
        return self

    def _merge_from(self, other: Any) -> None:
        """Merge ``other``'s state; runs before the counts are added."""
        raise NotImplementedError

    def settle_(self) -> Stat:
        """Make the current state the agreed state, as a save and reload would.

        Equivalent to ``stat.load_state_dict(stat.state_dict())``, cheaper.
        """
        with torch.no_grad():
            for name in self.agreed_names():
                value, agreed = self._buffers[name], self._buffers[AGREED + name]
                assert value is not None and agreed is not None
                if (agreed.device, agreed.dtype, agreed.shape) == (
                    value.device, value.dtype, value.shape
                ):
                    agreed.copy_(value)
                else:  # a load with assign=True replaced the saved buffer, not the hidden one
                    self._buffers[AGREED + name] = value.detach().clone()
        return self

    # ----------------------------------------------------------------------------- sync hooks
    # The states whose elements the moments of the sync hooks are, in turn (for "moments" state).
    sync_elements: tuple[str, ...] = ()

    @classmethod
    def sync_new_data(cls, batch: StatBatch) -> Moments | None:
        """The batch's data since its agreed state as float64 :class:`Moments` -- ``n`` one
        count per stat (``[K]``), ``mean`` about the centre every rank shares (the agreed mean)
        and ``m2`` per element of :attr:`sync_elements` -- for stats with ``"moments"`` state.
        The sync calls it on pieces of a batch (:meth:`StatBatch.chunks`)."""
        return None

    @classmethod
    def sync_absorb(cls, batch: StatBatch, new: Moments) -> None:
        """Merge every rank's new data (as :meth:`sync_new_data` gives it: counts per stat,
        means about the agreed mean) into the agreed state; after it the saved state is the
        global state."""

    # ----------------------------------------------------------------------------- persistence
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.check()  # a checkpoint is a host read: a batch refused on the device surfaces here
        super()._save_to_state_dict(destination, prefix, keep_vars)

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
        own = self._persistent_names()
        if not any(prefix + name in state_dict for name in own):
            # Not in this checkpoint at all (strict=False loading of another model's weights):
            # left as it is; torch reports the missing keys as usual.
            torch.nn.Module._load_from_state_dict(
                self, state_dict, prefix, local_metadata, strict, missing_keys,
                unexpected_keys, error_msgs,
            )
            return
        version = local_metadata.get("version")
        if version is None:
            # No version: a state dict without torch's metadata (a filtered copy). It may lack
            # the bookkeeping buffers: they load as 0 skipped, not frozen.
            for key in ("n_skipped", "frozen_flag"):
                default = torch.zeros_like(getattr(self, key))
                state_dict.setdefault(prefix + key, default)
        self._migrate(state_dict, prefix, version)
        # Atomic: every key is checked before any is copied; a misfit is refused whole.
        problem = self._state_problem(state_dict, prefix, version)
        if problem is not None:
            raise CheckpointMismatchError(
                f"{self.stat_name}: {problem}; the stat was not loaded (it is unchanged)"
            )
        if local_metadata.get("assign_to_params_buffers"):
            # assign=True would adopt the saved tensors' dtypes: the accumulator dtype wins.
            for name in own:
                mine, value = self._buffers[name], state_dict[prefix + name]
                assert mine is not None
                if value.dtype != mine.dtype:
                    state_dict[prefix + name] = value.to(mine.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _migrate(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        """Bring a state saved at an older ``version`` to this layout (subclasses)."""

    def _after_load(self, local_metadata: dict[str, Any] | None = None) -> None:
        # Loading is not a hot path: reading the frozen flag on the host is fine here. A meta
        # flag holds no value (a meta model loaded without assign=True): configuration stays.
        if self.frozen_flag.device.type != "meta":
            self._frozen = bool(self.frozen_flag)
        count = self.count
        refused = self._buffers["_refused"]
        if refused is None or refused.device != count.device:  # assign=True onto meta
            self._buffers["_refused"] = torch.zeros_like(count)
        else:
            refused.zero_()
        self.settle_()

    def adopt_state_(self) -> Stat:
        """Treat the current buffers as a freshly loaded state (read ``frozen_flag`` back and
        settle), for code that wrote a stat's buffers directly (a broadcast, a copy)."""
        self._after_load(None)
        return self

    @classmethod
    def summarize_state(cls, state: Mapping[str, Any]) -> StateSummary | None:
        """Read a saved state of this class (its ``state_dict``, keys without prefix; other keys
        are ignored) back through the class itself, or None when ``state`` holds none.

        The class's own keys, load checks and read-outs decide (``std`` from ``var``), so a
        reader of checkpoints repeats none of them. Read in float64, nothing is rounded.
        """
        proto = cls(2)
        saved = proto.state_dict()
        own = {k: state[k] for k in saved if isinstance(state.get(k), Tensor)}
        if any(own[k].is_floating_point() != saved[k].is_floating_point() for k in own):
            return None  # e.g. a float `count`: someone else's buffers under the same names
        # A feature-shaped state tells the saved feature shape.
        ref = next((own[k] for k in own if saved[k].shape == proto.shape), None)
        if ref is None or ref.dim() == 0 or ref.numel() == 0:
            return None
        try:
            stat = cls._for_saved_state(tuple(ref.shape), own)
            stat.load_state_dict(own)  # a plain dict: bookkeeping keys may be missing
        except (CheckpointMismatchError, RuntimeError, ValueError, TypeError):
            return None
        b = stat._buffers
        return StateSummary(
            kind=cls.__name__,
            keys=tuple(own),
            shape=stat.shape,
            dtype=ref.dtype,
            count=int(stat.count),
            n_skipped=int(stat.n_skipped),
            frozen=stat.frozen,
            features={n: getattr(stat, n).reshape(-1) for n in cls._summary_features},
            scalars={
                n: float(t)
                for n in stat.state_names
                if isinstance(t := b[n], Tensor) and t.is_floating_point() and t.dim() == 0
            },
        )

    @classmethod
    def _for_saved_state(cls, shape: tuple[int, ...], state: Mapping[str, Tensor]) -> Stat:
        """A float64 stat of this class and ``shape`` that can load ``state`` (a class whose
        configuration shapes its state, such as a sketch's bucket count, reads it here)."""
        return cls(shape, accumulator_dtype=torch.float64)

    def _persistent_names(self) -> list[str]:
        return [n for n in self._buffers if n not in self._non_persistent_buffers_set]

    def _state_problem(
        self, state_dict: dict[str, Any], prefix: str, version: int | None
    ) -> str | None:
        """Why ``state_dict`` cannot be this stat's state (None when it can)."""
        own = self._persistent_names()
        foreign = [
            k
            for k in state_dict
            if k.startswith(prefix)
            and k[len(prefix) :] not in own
            and k[len(prefix) :].split(".", 1)[0] not in self._modules
        ]
        if foreign:
            return (
                f"unexpected key(s) {', '.join(map(repr, foreign))}: not state of a "
                f"{type(self).__name__} (was it saved by another class under the same name?)"
            )
        missing = [prefix + n for n in own if prefix + n not in state_dict]
        if missing:
            return (
                f"missing key(s) {', '.join(map(repr, missing))}: a {type(self).__name__} "
                "needs all of its state (was it saved by another class under the same name?)"
            )
        if isinstance(version, int) and version > self._version:
            return (
                f"the state was saved at version {version}, newer than this statplug's "
                f"{type(self).__name__} (version {self._version}); upgrade statplug"
            )
        values: dict[str, Tensor] = {}
        for name in own:
            key, value, mine = prefix + name, state_dict[prefix + name], self._buffers[name]
            assert mine is not None
            if not isinstance(value, Tensor):
                return f"{key!r} must be a tensor, got {type(value).__name__}"
            if value.shape != mine.shape:
                return (
                    f"size mismatch for {key!r}: expected shape {tuple(mine.shape)}, got "
                    f"{tuple(value.shape)}"
                )
            if value.is_complex() or (value.dtype is torch.bool) != (mine.dtype is torch.bool):
                return f"{key!r} must be a {mine.dtype} tensor, got {value.dtype}"
            if value.layout is not torch.strided:
                return f"{key!r} must be a dense tensor, got layout {value.layout}"
            values[name] = value
        if any(v.device.type == "meta" for v in values.values()):
            return None  # a meta state holds no values to check (a meta model's own state)
        return self._value_problem(prefix, {n: v.detach().cpu() for n, v in values.items()})

    def _value_problem(self, prefix: str, values: dict[str, Tensor]) -> str | None:
        """Why the (CPU) state ``values`` is not a state this stat can hold (None if it is)."""
        for name in ("count", "n_skipped"):
            v = values[name].double()
            if not (bool(v.isfinite()) and float(v) >= 0 and float(v) == math.floor(float(v))):
                return (
                    f"{prefix + name!r} must be a non-negative whole number of samples, got "
                    f"{values[name].item()!r}"
                )
        return None

    def extra_repr(self) -> str:
        extra = f"shape={self.shape}, accumulator_dtype={self.accumulator_dtype}"
        if self.nan_policy != "raise":
            extra += f", nan_policy={self.nan_policy!r}"
        # A repr is not a hot path: one host read for the count is fine here.
        return extra + f", count={int(self.count)}"


class StatBatch:
    """Stats of one class and layout whose state a sync reads and writes as flat float64
    tensors: each state's elements, stat after stat (a 0-dim state gives one per stat).

    Reads gather with one ``cat`` (or ``stack``) per state and are kept until that state is
    written; writes copy back with one multi-tensor copy: a sync's work is a constant number of
    tensor calls per batch, whatever the number of stats. A large batch is worked on in
    :meth:`chunks`, batches of their own: runs of whole stats, or a range of the features of one
    stat (whose feature-shaped states are then read and written in that range, the others whole).
    """

    def __init__(self, stats: list[Stat], features: slice | None = None) -> None:
        self.stats = stats
        self.features = features  # a range of the one stat's features; None: all of them
        self._read: dict[str, Tensor] = {}
        self._sizes: dict[tuple[str, torch.device], Tensor] = {}  # elements per stat

    def buffers(self, name: str) -> list[Tensor]:
        """State ``name`` of every stat (of a feature-shaped state, the batch's features)."""
        bufs = cast(list[Tensor], [s._buffers[name] for s in self.stats])
        if self.features is None or bufs[0].shape != self.stats[0].shape:
            return bufs
        return [bufs[0].view(-1)[self.features]]

    def numel(self, name: str) -> int:
        """The elements of state ``name`` in the batch."""
        return sum(b.numel() for b in self.buffers(name))

    def chunks(self, size: int) -> list[StatBatch]:
        """The batch as batches of at most ``size`` features where it can be cut: runs of whole
        stats, and ranges of the features of a larger stat (with contiguous buffers); ``[self]``
        when the whole batch is small."""
        if sum(s.n_features for s in self.stats) <= size:
            return [self]
        out: list[StatBatch] = []
        run: list[Stat] = []
        in_run = 0  # features of the stats in `run`
        for s in self.stats:
            if run and in_run + s.n_features > size:
                out.append(StatBatch(run))
                run, in_run = [], 0
            if s.n_features > size and all(b.is_contiguous() for b in s.buffers()):
                out += [StatBatch([s], slice(lo, lo + size)) for lo in range(0, s.n_features, size)]
            else:
                run.append(s)
                in_run += s.n_features
        return [*out, StatBatch(run)] if run else out

    def read(self, name: str) -> Tensor:
        """State ``name`` of every stat, flat, in float64 (for one float64 stat a view of its
        buffer: read, never write into it)."""
        value = self._read.get(name)
        if value is None:
            value = self._read[name] = flat_cat(self.buffers(name)).to(torch.float64)
        return value

    def agreed(self, name: str) -> Tensor:
        """The agreed copy of state ``name`` of every stat, flat, in float64."""
        return self.read(AGREED + name)

    def write(self, name: str, value: Tensor) -> None:
        """Copy the flat ``value`` into state ``name`` of every stat (cast to its dtype)."""
        self._read.pop(name, None)
        bufs = self.buffers(name)
        value = value.to(bufs[0].device, bufs[0].dtype)
        if all(b.dim() == 0 for b in bufs):
            copy_all_(bufs, list(value.unbind(0)))
            return
        parts = zip(value.split([b.numel() for b in bufs]), bufs, strict=True)
        copy_all_(bufs, [p if b.dim() == 1 else p.view(b.shape) for p, b in parts])

    def per_element(self, per_stat: Tensor, *names: str) -> Tensor:
        """A ``[K]`` value per stat repeated over the elements of states ``names`` (the
        elements of each state in turn) -- for one stat and one state, the ``[1]`` value
        itself, which broadcasts over them (an op on it costs one element, not one per
        feature)."""
        if len(names) > 1:
            return torch.cat([self.per_element(per_stat, n).expand(self.numel(n)) for n in names])
        bufs = self.buffers(names[0])
        if len(bufs) == 1:
            return per_stat
        key = (names[0], per_stat.device)  # a sync expands over the same states several times
        sizes = self._sizes.get(key)
        if sizes is None:
            sizes = self._sizes[key] = torch.tensor([b.numel() for b in bufs], device=key[1])
        return per_stat.repeat_interleave(sizes)

    def settle(self) -> None:
        """Make every stat's state its agreed state (see :meth:`Stat.settle_`)."""
        self._read.clear()
        for name in self.stats[0].agreed_names():
            values, agreed = self.buffers(name), self.buffers(AGREED + name)
            if all(
                (a.device, a.dtype, a.shape) == (v.device, v.dtype, v.shape)
                for a, v in zip(agreed, values, strict=True)
            ):
                copy_all_(agreed, values)
            else:  # a load with assign=True replaced some buffers: one stat at a time
                for s in self.stats:
                    s.settle_()
                return


def _select(rows: Tensor, keep: Tensor) -> Tensor:
    """The rows where ``keep`` (bool) is True, in one copy (``index_select`` of their indices:
    3x faster on the CPU than ``rows[keep]``, measured on 4096x512 float32)."""
    return rows.index_select(0, keep.nonzero().squeeze(1))


def flat_cat(tensors: list[Tensor]) -> Tensor:
    """The tensors' elements in one flat tensor (0-dim ones stacked, 1-D ones concatenated
    as they are: a ``reshape`` per tensor costs a microsecond each)."""
    if all(t.dim() == 0 for t in tensors):
        return torch.stack(tensors)
    if len(tensors) == 1:
        return tensors[0].reshape(-1)  # a view: one big stat is not copied to be read
    return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors])
