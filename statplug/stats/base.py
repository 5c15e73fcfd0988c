"""The :class:`Stat` base: declared, mergeable, dtype-pinned state held in buffers.

A stat declares each piece of its state once, in ``__init__``, with :meth:`Stat.add_state` and the
rule by which that piece merges across ranks. Everything is a registered buffer, so it is saved in
``state_dict``, moved by ``.to()`` and never seen by an optimizer.

One source of truth: a stat's whole state is its buffers. Every public call leaves the saved
buffers current (an update writes ``count``, ``mean``, ... before it returns), so tools that copy,
swap, average or shard buffers without going through statplug see the real state. The only other
buffers are the *agreed* state (``_base_*``, non-persistent): the value every rank held at the
last sync or load, from which a sync tells each rank's new data apart so nothing is counted twice.

Sync protocol (used by :func:`statplug.sync_stats`, which coalesces it over every stat): a stat
contributes float64 tensors to a first SUM all-reduce and to one MAX all-reduce (a minimum travels
as a negated maximum), then, knowing the phase-1 totals, possibly to a second SUM all-reduce.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from statplug._buffers import PinnedDtypeModule
from statplug._compat import is_functorch_wrapped
from statplug.errors import CheckpointMismatchError, StatplugError
from statplug.stats._kernels import GROUP_ROWS, exact_moments, moments_ok, rows_per_group
from statplug.stats.syncing import Extrema, StateSums, SyncBatch, SyncPayload

__all__ = ["NanPolicy", "Stat", "StateSummary", "SyncBatch", "real_number"]

NanPolicy = Literal["raise", "skip", "propagate"]
_NAN_POLICIES = ("raise", "skip", "propagate")
_REDUCES = ("sum", "min", "max", "custom")
_ACCUMULATOR_DTYPES = (torch.float32, torch.float64)


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


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _host_count(count: Tensor) -> bool:
    """Whether ``count`` can be read on the host for free: a plain CPU tensor (a memory read,
    no device to wait for) outside ``torch.compile``, ``torch.jit.trace`` (which would bake the
    value into the trace) and functorch transforms (``vmap`` refuses host reads). Elsewhere the
    update's weights stay on the device."""
    return (
        type(count) is Tensor
        and count.is_cpu
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not is_functorch_wrapped(count)
    )


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


class Stat(PinnedDtypeModule):
    """Base class of every running statistic.

    Subclasses call :meth:`add_state` in ``__init__`` for each piece of state and implement
    :meth:`_update`, :meth:`_update_skip`, :meth:`_merge_from` and the sync hooks. The base owns
    argument checking, the nan policy, freezing, the int64 ``count``, and the agreed state of
    ``sum``-reduced states.

    Args:
        shape: feature shape; every leading dim of an update is a sample dim.
        accumulator_dtype: dtype of the saved state and the read-outs, ``torch.float32`` or
            ``torch.float64``. It survives ``.half()``, ``.to(torch.bfloat16)`` and precision
            plugins. Default: ``torch.float32``.
        nan_policy: ``"raise"`` (``ValueError``, stat unchanged), ``"skip"`` (rows with a
            non-finite value are dropped and counted in ``n_skipped``) or ``"propagate"``.
            Default: ``"raise"``.
    """

    count: Tensor
    n_skipped: Tensor
    frozen_flag: Tensor
    # Per-feature read-outs a summary of the saved state reports (see `summarize_state`).
    _summary_features: tuple[str, ...] = ("mean", "std")

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        accumulator_dtype: torch.dtype = torch.float32,
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
        self._n_dims = len(self.shape)
        self._device = _device_arg(device, name)
        # Width of an [n, F] batch the update fast paths take inline (-1: none, N-D features).
        self._row_features = self.n_features if self._n_dims == 1 else -1
        self._reduces: dict[str, str] = {}
        # Frozen-ness is configuration, like `training`: kept on the module (so an update can
        # return without touching the device) and saved in `frozen_flag`, which every load
        # reads back. freeze()/unfreeze() change both.
        self._frozen = False
        self.add_state("count", torch.zeros((), dtype=torch.int64), reduce="sum")
        self.add_state("n_skipped", torch.zeros((), dtype=torch.int64), reduce="sum")
        self.register_buffer("frozen_flag", self._on_device(torch.zeros((), dtype=torch.bool)))

    # ----------------------------------------------------------------------------- declaration
    def add_state(self, name: str, default: Tensor, *, reduce: str) -> None:
        """Register ``default`` as buffer ``name`` that merges across ranks by ``reduce``.

        ``reduce`` is resolved here, once: ``"sum"`` (counts; only the part added since the last
        sync travels), ``"min"``, ``"max"`` or ``"custom"`` (the subclass's sync hooks merge it).
        """
        if reduce not in _REDUCES:
            raise ValueError(
                f"{type(self).__name__}.add_state({name!r}): `reduce` must be one of {_REDUCES}, "
                f"got {reduce!r}"
            )
        if default.is_floating_point() and default.dtype not in _ACCUMULATOR_DTYPES:
            raise ValueError(
                f"{type(self).__name__}.add_state({name!r}): floating state must be float32 or "
                f"float64, got {default.dtype}"
            )
        self.register_buffer(name, self._on_device(default))
        self._reduces[name] = reduce
        if reduce == "sum":
            # The value at the last sync (or load): what every rank already agrees on.
            self._hidden(f"_base_{name}", default.clone())

    def _on_device(self, t: Tensor) -> Tensor:
        return t if self._device is None else t.to(self._device)

    def _hidden(self, name: str, default: Tensor) -> None:
        """A non-persistent buffer (moved with the stat, never saved)."""
        self.register_buffer(name, self._on_device(default), persistent=False)

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the declared (saved, synced) state buffers."""
        return tuple(self._reduces)

    def agreed_names(self) -> list[str]:
        """Hidden buffers holding the agreed state (equal on every rank after a sync or load)."""
        return [f"_base_{n}" for n in self._sum_states()]

    # ----------------------------------------------------------------------------- update path
    def _rows(self, x: Any) -> Tensor | None:
        """Validate ``x`` and view it as ``[n_samples, n_features]``; None when there is nothing
        to do (frozen, or no samples)."""
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{self.stat_name}.update: expected a torch.Tensor, got {type(x).__name__}"
            )
        k = self._n_dims
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != self.shape:
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
        if x.device.type == "meta":
            raise ValueError(
                f"{self.stat_name}.update: got a meta tensor (no data); materialise the input "
                "(and the stat, with to_empty() and reset_parameters()) first"
            )
        if self._frozen:
            return None
        if x.requires_grad:
            x = x.detach()  # never build a graph through the stat
        if not x.is_floating_point():
            x = x.to(self.accumulator_dtype)
        elif x.dtype not in _ACCUMULATOR_DTYPES:  # float16, bfloat16, float8: no kernels
            x = x.float()
        if x.dim() != 2 or k != 1:
            x = x.reshape(-1, self.n_features)
        return x if x.shape[0] else None

    def _plain_rows(self, x: Any, dtypes: tuple[torch.dtype, ...]) -> bool:
        """Whether ``x`` is the common case an update takes inline, skipping :meth:`_rows`'
        checks (a large part of a small update's cost): a dense ``[n, F]`` tensor of one of
        ``dtypes`` with ``n > 0`` that needs no grad, for an unfrozen stat that does not skip
        rows. (No no_grad needed then: nothing requires grad, so nothing is recorded.)"""
        return (
            type(x) is Tensor
            and x.dim() == 2
            and x.shape[1] == self._row_features
            and x.shape[0] > 0
            and x.dtype in dtypes
            and not x.requires_grad
            and not self._frozen
            and self.nan_policy != "skip"
            and not x.is_meta
            and x.layout is torch.strided
        )

    def update(self, x: Tensor) -> None:
        """Add the samples in ``x`` (shape ``[..., *shape]``) to the statistic.

        Never builds a graph and never reads a tensor value on the host, except with
        ``nan_policy="raise"``, which looks once per update to decide whether to raise.
        """
        self._check_pinned_dtypes()  # a wrapper's `buffer.data` cast: raise before any change
        rows = self._rows(x)
        if rows is None:
            return
        with torch.no_grad():
            if self.nan_policy == "skip":
                self._update_skip(rows)
            else:
                self._update(rows, self.nan_policy == "raise")

    def _check_finite(self, value: Tensor) -> None:
        """The ``raise`` policy's one host read: ``value`` is NaN when the batch held a NaN or
        Inf. Raises before any state is written."""
        self._refuse_compile()
        if math.isnan(float(value)):
            self._raise_non_finite()

    def _refuse_compile(self) -> None:
        if _compiling():
            raise StatplugError(
                f"{self.stat_name}: nan_policy='raise' needs a host read per update, which "
                "torch.compile(fullgraph=True) cannot trace; build the stat with "
                "nan_policy='skip' or 'propagate' to compile it"
            )

    def _checked_moments(self, x: Tensor, mb: Tensor, vb: Tensor) -> tuple[Tensor, Tensor]:
        """The ``raise`` policy's check of ``x``'s one-kernel column means ``mb`` and population
        variances ``vb`` (``batch_moments``): the ones to merge, or an error.

        The policy's one host read (a score of the one-kernel result, see
        ``statplug.stats._kernels.moments_ok``) decides: raise when the batch holds a NaN or
        Inf; recompute the batch exactly (float64, around a pivot) when the kernel's float32
        sums may be off by more than its tolerance (data far from 0 against its spread), have
        overflowed (finite values near the dtype's maximum) or the batch is too large for the
        accumulator; else, on ordinary data, keep the one-kernel result. Raises before any
        state is written.
        """
        self._refuse_compile()
        n, f = x.shape
        rows = n if n <= GROUP_ROWS else rows_per_group(n, f)
        ok = moments_ok(mb, vb, rows, x.dtype, self.accumulator_dtype)
        if ok:
            return mb, vb
        if ok is None and not bool(torch.isfinite(x).all()):
            self._raise_non_finite()
        mb, vb = exact_moments(x)
        prospective = self._prospective_state(mb, vb, n)
        acc = self.accumulator_dtype
        for value, now in prospective:
            # Elements already non-finite (a loaded propagated NaN) are not this batch's doing.
            if not bool((value.to(acc).isfinite() | ~now.isfinite()).all()):
                raise ValueError(
                    f"{self.stat_name}: the batch's values are too large for a {acc} "
                    "accumulator (the updated state would overflow to Inf); the stat was left "
                    "unchanged. Build the stat with accumulator_dtype=torch.float64"
                )
        return mb, vb

    def _prospective_state(self, mean: Tensor, var: Tensor, n: int) -> list[tuple[Tensor, Tensor]]:
        """(float64 value after an update with a batch of ``n`` rows of column ``mean`` and
        ``var``, the current value) for each floating state an update writes (subclasses)."""
        return []

    def _raise_non_finite(self) -> None:
        raise ValueError(
            f"{self.stat_name}: input contains NaN or Inf and nan_policy='raise'; the stat was "
            "left unchanged. Use nan_policy='skip' to drop such rows or 'propagate' to keep them"
        )

    def _update(self, x: Tensor, check: bool) -> None:
        raise NotImplementedError

    def _update_skip(self, x: Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Update in training mode; return ``x`` unchanged (a stat can sit in a Sequential)."""
        if self.training:
            self.update(x)
        return x

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
        with torch.no_grad():
            for name in self._reduces:
                self._buffers[name].copy_(self._initial_value(name))  # type: ignore[union-attr]
            self.settle_()

    def reset_parameters(self) -> None:
        """Same as :meth:`reset`, and unfrozen: the meta-device flow (``to_empty()`` then
        ``reset_parameters()``) leaves an empty, valid stat instead of uninitialised memory."""
        self.unfreeze()
        self.reset()

    def _initial_value(self, name: str) -> Tensor:
        buf = self._buffers[name]
        assert buf is not None
        if self._reduces[name] == "min":
            return torch.full_like(buf, math.inf)
        if self._reduces[name] == "max":
            return torch.full_like(buf, -math.inf)
        return torch.zeros_like(buf)

    def merge_(self, other: Stat) -> Stat:
        """Merge ``other`` (same class and shape) into this stat, exactly; returns ``self``.

        The merged samples count as this rank's new data at the next sync.
        """
        if type(other) is not type(self) or other.shape != self.shape:
            raise ValueError(
                f"{self.stat_name}.merge_: expected a {type(self).__name__} of shape {self.shape}, "
                f"got {type(other).__name__} of shape {getattr(other, 'shape', None)}"
            )
        with torch.no_grad():
            self._merge_from(other)
            self.count.add_(other.count)
            self.n_skipped.add_(other.n_skipped)
        return self

    def _merge_from(self, other: Any) -> None:
        """Merge ``other``'s state; runs before the counts are added."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- persistence
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
            # Not in this checkpoint at all (strict=False loading of another model's weights,
            # say): left as it is; torch reports the missing keys as usual.
            torch.nn.Module._load_from_state_dict(
                self,
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
            return
        version = local_metadata.get("version")
        if version is None:
            # No version: a state dict without torch's metadata (a filtered copy, a callback's
            # state). It may lack the bookkeeping buffers: they load as 0 skipped, not frozen.
            for key in ("n_skipped", "frozen_flag"):
                default = torch.zeros_like(self._buffers[key])  # type: ignore[arg-type]
                state_dict.setdefault(prefix + key, default)
        # Version 1: the first layout, and the current one (newer versions are refused below).
        # Atomic: every key is checked before any is copied; a misfit is refused whole, even
        # with strict=False.
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

    @classmethod
    def summarize_state(cls, state: Mapping[str, Any]) -> StateSummary | None:
        """Read a saved state of this class (its ``state_dict``, keys without prefix; other keys
        are ignored) back through the class itself, or None when ``state`` holds none.

        The class's own keys, load checks and read-outs decide (``std`` from ``var``), so a
        reader of checkpoints repeats none of them. Read in float64, nothing is rounded.
        """
        proto = cls(1)
        saved = proto.state_dict()
        own = {k: state[k] for k in saved if isinstance(state.get(k), Tensor)}
        if any(own[k].is_floating_point() != saved[k].is_floating_point() for k in own):
            return None  # e.g. a float `count`: someone else's buffers under the same names
        ref = next((own[k] for k in own if saved[k].dim() > 0), None)
        if ref is None or ref.dim() == 0 or ref.numel() == 0:
            return None
        try:
            stat = cls(tuple(ref.shape), accumulator_dtype=torch.float64)
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
                n: float(t)  # type: ignore[arg-type]
                for n in stat.state_names
                if (t := b[n]) is not None and t.is_floating_point() and t.dim() == 0
            },
        )

    def _persistent_names(self) -> list[str]:
        return [n for n in self._buffers if n not in self._non_persistent_buffers_set]

    def _state_problem(
        self, state_dict: dict[str, Any], prefix: str, version: int | None
    ) -> str | None:
        """Why ``state_dict`` cannot be this stat's state (None when it can)."""
        if isinstance(version, int) and version > self._version:
            return (
                f"the state was saved at version {version}, newer than this statplug's "
                f"{type(self).__name__} (version {self._version}); upgrade statplug"
            )
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

    def _after_load(self, local_metadata: dict[str, Any] | None = None) -> None:
        # Loading is not a hot path: reading the frozen flag on the host is fine here. A meta
        # flag holds no value (a meta model loaded without assign=True): configuration stays.
        if self.frozen_flag.device.type != "meta":
            self._frozen = bool(self.frozen_flag)
        self.settle_()

    def adopt_state_(self) -> Stat:
        """Treat the current buffers as a freshly loaded state: read ``frozen_flag`` back and
        settle (:meth:`settle_`). For code that writes a stat's buffers directly (a broadcast, a
        copy between stats) and wants the stat to behave as after ``load_state_dict``."""
        self._after_load(None)
        return self

    def settle_(self) -> Stat:
        """Make the current state the agreed state, as a save and reload would.

        A loaded state is what every rank agrees on: a later sync contributes only data added
        after it. Equivalent to ``stat.load_state_dict(stat.state_dict())``, cheaper.
        """
        with torch.no_grad():
            for name in self._sum_states():
                self._agree(f"_base_{name}", name)
            self._settle_agreed()
        return self

    def _agree(self, agreed_name: str, name: str) -> None:
        """Copy buffer ``name`` into the agreed buffer ``agreed_name`` -- as a new tensor when
        they differ in device, dtype or shape (a load with ``assign=True``, say into a model
        built on the meta device, replaces the saved buffers but not the hidden ones)."""
        agreed, value = self._buffers[agreed_name], self._buffers[name]
        assert agreed is not None and value is not None
        if (agreed.device, agreed.dtype, agreed.shape) == (value.device, value.dtype, value.shape):
            agreed.copy_(value)
        else:
            self._buffers[agreed_name] = value.detach().clone()

    def _settle_agreed(self) -> None:
        """Copy the subclass's own agreed state from its current state (subclasses)."""

    # ----------------------------------------------------------------------------- sync hooks
    # Class-level and batched: one call handles every stat of a batch (see
    # statplug.stats.syncing) with a constant number of tensor ops and returns named float64
    # payloads, which the engine packs with every other batch's into one collective per round.

    @classmethod
    def sync_checksum(cls, batch: SyncBatch) -> Tensor:
        """A float64 ``[4]`` exact fingerprint of the batch's agreed state: equal on ranks that
        agree bit for bit."""
        return batch.checksum()

    @classmethod
    def sync_phase1(cls, batch: SyncBatch) -> tuple[StateSums, Extrema | None]:
        """The first SUM payload and the MAX payload (None: no min/max state).

        Sum states send what was added since the agreed state; min/max states send their values
        and a NaN flag per element, so a NaN on any rank reaches every rank. Subclasses extend
        the sums with their own fields (``StateSums`` subclasses, built from this one's
        :meth:`~SyncPayload.fields_dict`).
        """
        proto = batch.stats[0]
        names = tuple(proto._sum_states())
        sums = StateSums(names, torch.stack([batch.added(n) for n in names]))
        extrema = [(n, r) for n, r in proto._reduces.items() if r in ("min", "max")]
        if not extrema:
            return sums, None
        return sums, Extrema.of_batch(batch, [n for n, _ in extrema], [r for _, r in extrema])

    @classmethod
    def sync_phase2(cls, batch: SyncBatch, sums: StateSums) -> SyncPayload | None:
        """The second SUM payload, given the reduced first one; None: no second round.

        The choice must follow from ``sums`` alone, which is the same on every rank."""
        return None

    @classmethod
    def sync_apply(
        cls,
        batch: SyncBatch,
        sums: StateSums,
        maxes: Extrema | None,
        sums2: SyncPayload | None,
    ) -> None:
        """Write the reduced payloads back; afterwards every rank holds the global state, and
        it is the agreed state."""
        for name in sums.names:
            total = sums.of(name)
            # Counts travel as float64: sums of integers, exact below 2**53. A count no rank
            # added to (n_skipped, usually) needs no write: every rank already holds it.
            if name != "count" and not bool(total.any()):
                continue
            batch.scatter_agreed(name, batch.stack(f"_base_{name}") + total.to(torch.int64))
        if maxes is not None:
            for name in maxes.names:
                batch.scatter(name, maxes.value(name))

    def _sum_states(self) -> list[str]:
        return [n for n, r in self._reduces.items() if r == "sum"]

    def extra_repr(self) -> str:
        extra = f"shape={self.shape}, accumulator_dtype={self.accumulator_dtype}"
        if self.nan_policy != "raise":
            extra += f", nan_policy={self.nan_policy!r}"
        # A repr is not a hot path: one host read for the count is fine here.
        return extra + f", count={int(self.count)}"
