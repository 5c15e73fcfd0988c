"""The :class:`Stat` base: declared, mergeable, dtype-pinned state held in buffers.

A stat declares each piece of its state once, in ``__init__``, with :meth:`Stat.add_state` and the
rule by which that piece merges across ranks. Everything is a registered buffer, so it is saved in
``state_dict``, moved by ``.to()`` and never seen by an optimizer.

Sync protocol (used by :func:`statplug.sync_stats`, which coalesces it over every stat): a stat
contributes float64 tensors to a first SUM all-reduce and to one MAX all-reduce (a minimum travels
as a negated maximum), then, knowing the phase-1 totals, to a second SUM all-reduce. Only data seen
*since the last sync* is contributed, so a second sync changes nothing and a checkpoint loaded on N
ranks counts once.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from statplug._buffers import PinnedDtypeModule
from statplug.errors import StatplugError

__all__ = ["NanPolicy", "Stat", "SyncBatch"]

NanPolicy = Literal["raise", "skip", "propagate"]
_NAN_POLICIES = ("raise", "skip", "propagate")
_REDUCES = ("sum", "min", "max", "custom")
_ACCUMULATOR_DTYPES = (torch.float32, torch.float64)


def _as_shape(shape: int | Sequence[int], owner: str) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    if isinstance(shape, (str, bytes)):
        raise ValueError(f"{owner}: `shape` must be an int or a tuple of ints, got {shape!r}")
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as err:
        raise ValueError(
            f"{owner}: `shape` must be an int or a tuple of ints, got {shape!r}"
        ) from err
    if any(s <= 0 for s in out):
        raise ValueError(f"{owner}: `shape` must have positive sizes, got {out}")
    return out


class Stat(PinnedDtypeModule):
    """Base class of every running statistic.

    Subclasses call :meth:`add_state` in ``__init__`` for each piece of state and implement
    :meth:`_update`, :meth:`_merge_from` and the sync hooks. The base owns argument checking, the
    nan policy, freezing, the int64 ``count``, and ``sum``-reduced states' bookkeeping.

    Args:
        shape: feature shape; every leading dim of an update is a sample dim.
        accumulator_dtype: dtype of the saved state and the read-outs, ``torch.float32`` or
            ``torch.float64``. It survives ``.half()``, ``.to(torch.bfloat16)`` and precision
            plugins. Default: ``torch.float32``.
        nan_policy: ``"raise"`` (``ValueError``, stat unchanged), ``"skip"`` (rows with a
            non-finite value are dropped and counted in ``n_skipped``) or ``"propagate"``.
            Default: ``"raise"``.
    """

    n_skipped: Tensor
    frozen_flag: Tensor

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
                f"{accumulator_dtype}; low precision accumulators silently stop growing"
            )
        if nan_policy not in _NAN_POLICIES:
            raise ValueError(
                f"{name}: `nan_policy` must be one of {_NAN_POLICIES}, got {nan_policy!r}"
            )
        self.accumulator_dtype = accumulator_dtype
        self.nan_policy: NanPolicy = nan_policy
        self.n_features = math.prod(self.shape)
        self._n_dims = len(self.shape)
        self._device = torch.device(device) if device is not None else None
        self._reduces: dict[str, str] = {}
        self._frozen = False
        self.add_state("count", torch.zeros((), dtype=torch.int64), reduce="sum")
        self.add_state("n_skipped", torch.zeros((), dtype=torch.int64), reduce="sum")
        # Saved so that a warm-up-then-freeze normalizer stays frozen after a reload.
        self.register_buffer("frozen_flag", self._on_device(torch.zeros((), dtype=torch.bool)))

    # ----------------------------------------------------------------------------- declaration
    def add_state(
        self, name: str, default: Tensor, *, reduce: str, persistent: bool = True
    ) -> None:
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
        # Written directly (as ``register_buffer`` does) so a class property of the same name can
        # serve the read-out: ``stat.mean`` brings the saved buffer up to date first.
        self._buffers[name] = self._on_device(default)
        self._reduces[name] = reduce
        if reduce == "sum":
            # The value at the last sync (or load): what every rank already agrees on.
            self._hidden(f"_base_{name}", default.clone())

    def _on_device(self, t: Tensor) -> Tensor:
        return t if self._device is None else t.to(self._device)

    def _hidden(self, name: str, default: Tensor) -> None:
        """A non-persistent working buffer (moved with the stat, never saved or synced)."""
        self.register_buffer(name, self._on_device(default), persistent=False)

    @property
    def count(self) -> Tensor:
        """Number of samples seen (int64, exact), shape ``()``."""
        self._flush()
        return self._buffers["count"]  # type: ignore[return-value]

    def _flush(self) -> None:
        """Fold work deferred by the update fast path into the buffers (subclasses)."""

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the declared (saved, synced) state buffers."""
        return tuple(self._reduces)

    # ----------------------------------------------------------------------------- update path
    def _check_input(self, x: Tensor) -> Tensor:
        """Validate ``x`` and view it as ``[n_samples, n_features]`` in a float dtype."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.stat_name}.update: expected a torch.Tensor, got {type(x)}")
        k = len(self.shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != self.shape:
            raise ValueError(
                f"{self.stat_name}: expected input whose trailing shape is {self.shape} "
                f"(got shape {tuple(x.shape)}); leading dims are samples"
            )
        if not x.is_floating_point():
            x = x.to(self.accumulator_dtype)
        return x.detach().reshape(-1, self.n_features)

    def update(self, x: Tensor) -> None:
        """Add the samples in ``x`` (shape ``[..., *shape]``) to the statistic.

        Never builds a graph and never reads a tensor value on the host, except with
        ``nan_policy="raise"``, which looks once per update to decide whether to raise.
        """
        if self._frozen:
            return
        x2 = self._check_input(x)
        if x2.shape[0] == 0:
            return
        with torch.no_grad():
            if self.nan_policy == "skip":
                self._update_skip(x2)
            else:
                self._update(x2, check=self.nan_policy == "raise")

    def _fast_input(self, x: Tensor) -> Tensor | None:
        """``x`` as ``[n_samples, n_features]`` for a subclass's update fast path, or None when
        there is nothing left to do: frozen, empty, or handled by :meth:`update` (validation
        errors, the skip policy and unusual inputs)."""
        if self._frozen:
            return None
        if x.shape[-self._n_dims :] != self.shape or self.nan_policy == "skip" or x.dim() == 0:
            Stat.update(self, x)
            return None
        if x.requires_grad:
            x = x.detach()  # never build a graph through the stat
        if x.dim() != 2 or self._n_dims != 1:
            x = x.reshape(-1, self.n_features)
        return x if x.shape[0] else None

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
                buf = self._buffers[name]
                assert buf is not None
                buf.copy_(self._initial_value(name, buf))
                if self._reduces[name] == "sum":
                    base = self._buffers[f"_base_{name}"]
                    assert base is not None
                    base.zero_()
            self._reset_hidden()

    def reset_parameters(self) -> None:
        """Same as :meth:`reset`: the meta-device flow (``to_empty()`` then ``reset_parameters()``)
        leaves an empty, valid stat instead of uninitialised memory."""
        self.reset()
        self.unfreeze()

    def _initial_value(self, name: str, buf: Tensor) -> Tensor:
        if self._reduces[name] == "min":
            return torch.full_like(buf, math.inf)
        if self._reduces[name] == "max":
            return torch.full_like(buf, -math.inf)
        return torch.zeros_like(buf)

    def _reset_hidden(self) -> None:
        """Reset non-persistent working buffers (subclasses)."""

    def merge_(self, other: Stat) -> Stat:
        """Merge ``other`` (same class and shape) into this stat, exactly; returns ``self``."""
        if type(other) is not type(self) or other.shape != self.shape:
            raise ValueError(
                f"{self.stat_name}.merge_: expected a {type(self).__name__} of shape {self.shape}, "
                f"got {type(other).__name__} of shape {getattr(other, 'shape', None)}"
            )
        with torch.no_grad():
            self.count.add_(other.count)
            self.n_skipped.add_(other.n_skipped)
            self._merge_from(other)
        return self

    def _merge_from(self, other: Any) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------------------- persistence
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Buffers that are views into a sync arena: save just their own elements.
        for name in self._reduces:
            key = prefix + name
            t = destination.get(key)
            if isinstance(t, Tensor) and t._base is not None and not keep_vars:
                destination[key] = t.clone()

    def _migrate_state_dict(
        self, state_dict: dict[str, Any], prefix: str, version: int | None
    ) -> None:
        # Stats saved without the optional bookkeeping buffers load with their defaults.
        for key, default in (("n_skipped", self.n_skipped), ("frozen_flag", self.frozen_flag)):
            state_dict.setdefault(prefix + key, torch.zeros_like(default))

    def _after_load(self) -> None:
        # A loaded state is what every rank agrees on: it is the base, never re-counted at a sync.
        # Loading is not a hot path, so reading the frozen flag on the host is fine here.
        self._frozen = bool(self.frozen_flag.item())
        for name, reduce in self._reduces.items():
            if reduce == "sum":
                base = self._buffers[f"_base_{name}"]
                buf = self._buffers[name]
                assert base is not None and buf is not None
                base.copy_(buf)
        self._rebase_after_load()

    def settle_(self) -> Stat:
        """Bring the working state to exactly what saving and reloading the stat gives.

        A stat may keep more precise working state than it saves (``RunningMoments`` keeps
        float64 sums, saves ``accumulator_dtype``); a run resumed from a checkpoint restarts from
        the saved values. Settling where a checkpoint may be written makes an uninterrupted run
        take the same path (``SyncStats`` does this). Data not yet synced becomes agreed data,
        as after a load. Equivalent to ``stat.load_state_dict(stat.state_dict())``, cheaper.
        """
        self._flush()
        self._after_load()
        return self

    def _rebase_after_load(self) -> None:
        """Rebuild hidden working state from the loaded persistent buffers (subclasses)."""

    # ----------------------------------------------------------------------------- sync hooks
    # Class-level and batched: one call handles every stat of a class with a constant number of
    # tensor ops (gather with one ``cat``, math on the flat tensors, scatter with one foreach
    # copy), so a sync costs no per-stat tensor op. Each hook returns a few flat float64
    # segments; the engine coalesces them into one collective per phase.

    @classmethod
    def _sync_phase1(cls, batch: SyncBatch) -> tuple[list[Tensor], list[Tensor]]:
        """Segments for the first SUM all-reduce and for the MAX all-reduce."""
        proto = batch.stats[0]
        sums = [
            (batch.stack(n) - batch.stack(f"_base_{n}")).to(torch.float64)
            for n in proto._sum_states()
        ]
        maxes = []
        for n, r in proto._reduces.items():
            if r in ("min", "max"):
                flat = batch.gather(n).to(torch.float64)
                maxes.append(flat if r == "max" else -flat)
        return sums, maxes

    @classmethod
    def _sync_checksum(cls, batch: SyncBatch) -> Tensor | None:
        """A float64 scalar checksum of state the hooks assume every rank agrees on, or None.

        Exchanged with the layout fingerprint before phase 1; when ranks differ,
        ``batch.agreed`` is False for the sync and the hooks must not rely on that state.
        """
        return None

    @classmethod
    def _sync_phase2(cls, batch: SyncBatch, sums1: list[Tensor]) -> list[Tensor]:
        """Segments for the second SUM all-reduce, given the reduced phase-1 segments.

        May be empty (no second collective when every class returns none); the choice must
        follow from ``sums1`` alone, which is the same on every rank."""
        return []

    @classmethod
    def _sync_apply(
        cls, batch: SyncBatch, sums1: list[Tensor], maxes: list[Tensor], sums2: list[Tensor]
    ) -> None:
        """Write the reduced segments back; afterwards every rank holds the global state."""
        proto = batch.stats[0]
        names = proto._sum_states()
        for name, total in zip(names, sums1[: len(names)], strict=True):
            # Counts travel as float64: sums of integers, exact below 2**53.
            base = batch.stack(f"_base_{name}")
            base.add_(total.to(torch.int64))
            batch.scatter(name, base)
        extrema = [(n, r) for n, r in proto._reduces.items() if r in ("min", "max")]
        for (name, r), flat in zip(extrema, maxes, strict=True):
            batch.scatter(name, flat if r == "max" else -flat)

    def _sum_states(self) -> list[str]:
        return [n for n, r in self._reduces.items() if r == "sum"]

    def extra_repr(self) -> str:
        extra = f"shape={self.shape}, accumulator_dtype={self.accumulator_dtype}"
        if self.nan_policy != "raise":
            extra += f", nan_policy={self.nan_policy!r}"
        # A repr is not a hot path: one host read for the count is fine here.
        return extra + f", count={int(self.count)}"


_BUFFERS = operator.attrgetter("_buffers")
_COUNT = operator.itemgetter("count")


class SyncBatch:
    """The stats of one class taking part in syncs, their state held in flat arenas.

    On first use of a state name, every stat's buffer of that name is moved into one flat tensor
    (the arena) and the stat's buffer is re-pointed at its view of it. From then on gathering is
    free (the arena *is* the gathered tensor) and writing back is one ``copy_``, whatever the
    number of stats: a sync does no per-stat tensor work. The stats keep working on their views
    in place as before. Anything that rebinds a stat's buffers (``.to()``, ``.half()``) makes
    the batch :meth:`stale`; the sync engine then builds a new one.

    Element layout: when every stat has the same number of features ``F`` (the usual case),
    :meth:`gather` gives ``[K, F]`` and :meth:`per_element` a ``[K, 1]`` view that broadcasts
    against it, so no per-element copy of per-stat values is made; otherwise both are flat.
    """

    def __init__(self, stats: Sequence[Stat]) -> None:
        self.stats = list(stats)
        self.sizes = [s.n_features for s in self.stats]
        self.device = self.stats[0]._buffers["count"].device  # type: ignore[union-attr]
        self._arenas: dict[str, Tensor] = {}
        self._gathered: dict[str, Tensor] = {}  # arenas in the element layout
        self._counts: list[Tensor | None] = [s._buffers["count"] for s in self.stats]
        self.uniform = len(set(self.sizes)) == 1
        self._index: Tensor | None = None  # stat index of each element (non-uniform layout)
        self.scratch: dict[str, Tensor] = {}  # values a class's hooks pass between phases
        # Set by the engine for each sync: do all ranks hold the same agreed (base) state, as
        # the classes' checksums say? Hooks may then centre data on it (see _sync_checksum).
        self.agreed = True
        self.cache: dict[str, Any] = {}  # what a class's hooks keep between syncs
        self._hash_weights: dict[int, Tensor] = {}

    def stale(self) -> bool:
        """Were any of the stats' buffers rebound (moved, converted) since the arenas were made?"""
        # C-level iteration: a sync checks this for every stat, every time.
        current = map(_COUNT, map(_BUFFERS, self.stats))
        return any(map(operator.is_not, current, self._counts))

    def _arena(self, name: str) -> Tensor:
        arena = self._arenas.get(name)
        if arena is None:
            bufs: list[Tensor] = [s._buffers[name] for s in self.stats]  # type: ignore[misc]
            if len({b.dtype for b in bufs}) > 1:  # the engine batches by accumulator dtype
                raise StatplugError(f"internal: stats of mixed dtypes share the arena {name!r}")
            # Never an inference tensor (a first sync may run under torch.inference_mode, as
            # Lightning's validation does): the stats' buffers must stay writable in training.
            with torch.inference_mode(False):
                if bufs[0].dim() == 0:
                    arena = torch.stack(bufs)
                    views = list(arena.unbind())
                else:
                    arena = torch.cat([b.reshape(-1) for b in bufs])
                    views = [
                        v.view(b.shape)
                        for v, b in zip(arena.split([b.numel() for b in bufs]), bufs, strict=True)
                    ]
            for stat, view in zip(self.stats, views, strict=True):
                stat._buffers[name] = view
            if name == "count":
                self._counts = list(views)
            self._arenas[name] = arena
        return arena

    def gather(self, name: str) -> Tensor:
        """Every stat's buffer ``name`` in the element layout (live: a view, not a copy)."""
        view = self._gathered.get(name)
        if view is None:
            arena = self._arena(name)
            with torch.inference_mode(False):
                view = arena.view(len(self.stats), -1) if self.uniform else arena
            self._gathered[name] = view
        return view

    def stack(self, name: str) -> Tensor:
        """Every stat's 0-dim buffer ``name`` as one ``[K]`` tensor (live: not a copy)."""
        return self._arena(name)

    def per_element(self, per_stat: Tensor) -> Tensor:
        """A ``[K]`` tensor lined up with :meth:`gather`'s layout (a view when uniform)."""
        if self.uniform:
            return per_stat.unsqueeze(1)
        if self._index is None:
            sizes = torch.tensor(self.sizes, device=self.device)
            self._index = torch.arange(len(self.sizes), device=self.device).repeat_interleave(
                sizes, output_size=sum(self.sizes)
            )
        return per_stat.index_select(0, self._index)

    def scatter(self, name: str, value: Tensor) -> None:
        """Write ``value`` (the :meth:`gather` or :meth:`stack` layout) into every stat's buffer."""
        self._arena(name).view(value.shape).copy_(value)

    def checksum(self, name: str) -> Tensor:
        """A float64 checksum of every stat's float64 buffer ``name`` (a scalar; NaN if not
        finite, which never counts as agreeing).

        A dot product with fixed pseudo-random weights (the same on every rank): a difference
        between ranks escapes it only by cancelling exactly against random weights, or by
        vanishing in rounding (then it is too small to matter). A sum, or small regular
        weights, would let structured differences cancel (a base of [2, -1] against [0, 0] with
        weights [1, 2]).
        """
        flat = self.gather(name).reshape(-1)
        weights = self._hash_weights.get(flat.numel())
        if weights is None:
            g = torch.Generator().manual_seed(0x5EED)
            w = torch.randn(flat.numel(), generator=g, dtype=torch.float64)
            weights = w.to(self.device)
            self._hash_weights[flat.numel()] = weights
        c = torch.dot(flat, weights)
        return torch.where(c.isfinite(), c, torch.nan)  # Inf on every rank proves nothing

    def zero(self, name: str) -> None:
        self._arena(name).zero_()
