"""What the stats' sync hooks work with: :class:`SyncBatch` and the named payloads.

A sync (:func:`statplug.sync_stats`) groups the stats by class and accumulator dtype into
:class:`SyncBatch` es. Each class's hooks (:meth:`Stat.sync_phase1` and friends) read every stat of
its batch at once, return float64 :class:`SyncPayload` s -- dataclasses whose tensor fields travel,
packed with every other batch's, in one all-reduce per phase -- and get them back reduced, by
name. The engine never looks inside a payload: it packs :meth:`SyncPayload.tensors` and unpacks
with :meth:`SyncPayload.rebuilt`.

The agreed state (``_base_*`` buffers: what every rank held at the last sync or load) of a
batch's stats lives in one tensor per name that the batch owns, each stat's buffer a view of its
row: a sync reads it without gathering and writes it in one copy. A stat whose agreed buffer was
replaced since (``.to()``, a load with ``assign=True``) is adopted again at the next sync. The
saved state (``count``, ``mean``, ...) stays in each stat's own tensors.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from statplug._buffers import fingerprint, fingerprint_weights

if TYPE_CHECKING:
    from statplug.stats.base import Stat

__all__ = ["Extrema", "StateSums", "SyncBatch", "SyncPayload"]

_F64 = torch.float64
_MODULE_BUFFERS = operator.attrgetter("_buffers")
P = TypeVar("P", bound="SyncPayload")


@dataclasses.dataclass(eq=False)
class SyncPayload:
    """Float64 tensors that travel together in one all-reduce, one per tensor field.

    Subclasses add fields; fields that are not tensors (names, say) stay on the rank.
    """

    def tensors(self) -> list[Tensor]:
        """The tensor fields, in declaration order: what the engine packs."""
        return [v for v in self._values() if isinstance(v, Tensor)]

    def rebuilt(self: P, reduced: Sequence[Tensor]) -> P:
        """The same payload with its tensor fields replaced by ``reduced`` (same order)."""
        it = iter(reduced)
        changes = {
            f.name: next(it)
            for f, v in zip(dataclasses.fields(self), self._values(), strict=True)
            if isinstance(v, Tensor)
        }
        return dataclasses.replace(self, **changes)

    def fields_dict(self) -> dict[str, Any]:
        """Every field by name (no copies): a subclass payload is built from its base's."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _values(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


@dataclasses.dataclass(eq=False)
class StateSums(SyncPayload):
    """The first SUM round: for each ``sum`` state (``count``, ``n_skipped``), what each stat
    added since the agreed state. Subclass payloads add their own sums."""

    names: tuple[str, ...]
    added: Tensor  # [len(names), K]

    def of(self, name: str) -> Tensor:
        """``[K]``: what each stat added to state ``name`` (summed over ranks once reduced)."""
        return self.added[self.names.index(name)]

    @property
    def count(self) -> Tensor:
        return self.of("count")


@dataclasses.dataclass(eq=False)
class Extrema(SyncPayload):
    """The MAX round of ``min``/``max`` states: each as a maximum (a minimum negated), NaN
    travelling as a flag so that a NaN on any rank reaches every rank."""

    names: tuple[str, ...]
    reduces: tuple[str, ...]  # "min" or "max", per name
    values: Tensor  # [len(names), elements]
    nan: Tensor  # 1.0 where the value was NaN

    @classmethod
    def of_batch(cls, batch: SyncBatch, names: Sequence[str], reduces: Sequence[str]) -> Extrema:
        flats = torch.stack([batch.gather(n).to(_F64).reshape(-1) for n in names])
        nan = flats.isnan()
        sign = torch.tensor([1.0 if r == "max" else -1.0 for r in reduces], dtype=_F64)
        values = torch.where(nan, -math.inf, flats * sign.to(flats.device).unsqueeze(1))
        return cls(tuple(names), tuple(reduces), values, nan.to(_F64))

    def value(self, name: str) -> Tensor:
        """The reduced state ``name`` (flat): the global min or max, NaN where any rank had one."""
        i = self.names.index(name)
        v = self.values[i] if self.reduces[i] == "max" else -self.values[i]
        return torch.where(self.nan[i] > 0, math.nan, v)


class SyncBatch:
    """The stats of one class and accumulator dtype taking part in a sync.

    Reads and writes are batched over the stats: the first :meth:`gather` of a sync stacks every
    saved state buffer of every stat in one ``torch.stack`` per dtype; the agreed state is read
    from the batch's own tensors (see the module docstring); :meth:`scatter` queues writes that
    :meth:`flush` applies in one ``torch._foreach_copy_``.

    Element layout: when every stat has the same ``shape`` (the usual case), :meth:`gather` gives
    ``[K, F]`` and :meth:`per_element` a ``[K, 1]`` view that broadcasts against it; otherwise both
    are flat. :meth:`stack` gives a 0-dim state as ``[K]``.
    """

    def __init__(self, stats: Sequence[Stat]) -> None:
        self.stats = list(stats)
        self.sizes = [s.n_features for s in self.stats]
        self.device = self.stats[0].count.device
        self.uniform = len({s.shape for s in self.stats}) == 1
        self._index: Tensor | None = None  # stat index of each element (non-uniform layout)
        self.work: Any = None  # what a class's hooks carry from one phase to the next
        proto = self.stats[0]
        self.state_names: tuple[str, ...] = proto.state_names
        self.agreed_names: tuple[str, ...] = tuple(proto.agreed_names())
        self._agreed: dict[str, tuple[Tensor, list[Tensor]]] = {}  # name: (tensor, row views)
        self._weights: dict[int, Tensor] = {}  # the checksum's fingerprint weights, by size
        self._cache: dict[str, Tensor] = {}
        self._pending: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._lists: dict[str, list[Tensor]] = {}
        self._staging: dict[str, tuple[Tensor, list[Tensor]]] = {}

    # ------------------------------------------------------------------ reading
    def begin(self) -> None:
        """Start a sync: forget values read by the previous one, list every stat's state
        buffers afresh (in one pass: buffers may have been rebound since), and adopt agreed
        buffers that are no longer views of the batch's tensors."""
        self._cache = {}
        self._pending = ([], [])
        rows = map(operator.itemgetter(*self.state_names), map(_MODULE_BUFFERS, self.stats))
        columns = rows if len(self.state_names) > 1 else ((r,) for r in rows)
        lists = map(list, zip(*columns, strict=True))
        self._lists = dict(zip(self.state_names, lists, strict=True))
        for name in self.agreed_names:
            held = self._agreed.get(name)
            current = [s._buffers[name] for s in self.stats]
            if held is None or any(map(operator.is_not, current, held[1])):
                self._adopt(name, current)  # type: ignore[arg-type]

    def _adopt(self, name: str, current: list[Tensor]) -> None:
        """Copy the agreed buffers ``name`` into one tensor and make each stat's buffer a view
        of its row (never an inference tensor: a later sync outside inference mode writes it)."""
        with torch.inference_mode(False), torch.no_grad():
            if current[0].dim() == 0 or self.uniform:
                tensor = torch.stack(current)
                views = list(tensor.unbind(0))
            else:
                tensor = torch.cat([c.reshape(-1) for c in current])
                views = [
                    p.view(c.shape) for p, c in zip(tensor.split(self.sizes), current, strict=True)
                ]
        for stat, view in zip(self.stats, views, strict=True):
            stat._buffers[name] = view
        self._agreed[name] = (tensor, views)

    def _read_all(self) -> None:
        """Stack every saved state buffer in one call per (dtype, rank of the tensor)."""
        proto = self.stats[0]
        groups: dict[tuple[torch.dtype, int], list[str]] = {}
        for name in self.state_names:
            buf = proto._buffers[name]
            assert buf is not None
            if buf.dim() == 0 or self.uniform:
                groups.setdefault((buf.dtype, buf.dim()), []).append(name)
        k = len(self.stats)
        for (_, dim), names in groups.items():
            bufs = [b for n in names for b in self._lists[n]]
            stacked = torch.stack(bufs).view(len(names), k, *(() if dim == 0 else (-1,)))
            self._cache.update(zip(names, stacked.unbind(0), strict=True))

    def gather(self, name: str) -> Tensor:
        """Every stat's buffer ``name`` in the element layout (read once per sync; do not
        modify it in place)."""
        value = self._cache.get(name)
        if value is not None:
            return value
        held = self._agreed.get(name)
        if held is not None:  # [K] (0-dim state), [K, *shape] (uniform) or flat
            tensor = held[0]
            return tensor.reshape(len(self.stats), -1) if tensor.dim() > 2 else tensor
        if not self._cache:
            self._read_all()
            value = self._cache.get(name)
        if value is None:  # a non-uniform layout
            bufs = self._lists[name]
            zero_dim = bufs[0].dim() == 0
            value = torch.stack(bufs) if zero_dim else torch.cat([b.reshape(-1) for b in bufs])
            self._cache[name] = value
        return value

    def stack(self, name: str) -> Tensor:
        """Every stat's 0-dim buffer ``name`` as one ``[K]`` tensor."""
        return self.gather(name)

    def added(self, name: str) -> Tensor:
        """What each stat added to ``sum`` state ``name`` since the agreed state (float64)."""
        return (self.gather(name) - self.gather(f"_base_{name}")).to(_F64)

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

    def checksum(self) -> Tensor:
        """A float64 ``[4]`` exact fingerprint of every stat's agreed state (see
        :func:`statplug._buffers.fingerprint`): equal on ranks that agree bit for bit, whatever
        their thread counts."""
        total: Tensor | None = None
        for i, name in enumerate(self.agreed_names, start=1):
            tensor = self._agreed[name][0]
            weights = self._weights.get(tensor.numel())
            if weights is None:
                weights = fingerprint_weights(tensor.numel(), tensor.device).to(torch.int64)
                self._weights[tensor.numel()] = weights
            part = fingerprint(tensor, weights, exact=True) * i  # small exact integers
            total = part if total is None else total + part
        assert total is not None
        return total

    # ------------------------------------------------------------------ writing
    def scatter(self, name: str, value: Tensor) -> None:
        """Queue writing ``value`` (the :meth:`gather` or :meth:`stack` layout) into every stat's
        buffer ``name`` (converted to its dtype); later reads in this sync see it. Applied by
        :meth:`flush`."""
        held = self._agreed.get(name)
        if held is not None:
            tensor = held[0]
            self._pending[0].append(tensor)
            self._pending[1].append(value.to(tensor.dtype).view(tensor.shape))
            self._cache[name] = value
            return
        bufs = self._lists[name]
        value = value.to(bufs[0].dtype)  # one conversion; the copies are then same-dtype
        if bufs[0].dim() == 0 or self.uniform:
            staging = self._staging.get(name)
            if (
                staging is None
                or staging[0].dtype != value.dtype
                or staging[0].device != value.device
            ):
                # Per-stat views made once, not per sync (never an inference tensor).
                with torch.inference_mode(False):
                    tensor = torch.empty(
                        (len(bufs), *bufs[0].shape), dtype=value.dtype, device=value.device
                    )
                    staging = self._staging[name] = (tensor, list(tensor.unbind(0)))
            staging[0].copy_(value.view(staging[0].shape))
            parts = staging[1]
        else:
            parts = [p.view(b.shape) for p, b in zip(value.split(self.sizes), bufs, strict=True)]
        self._pending[0].extend(bufs)
        self._pending[1].extend(parts)
        self._cache[name] = value

    def scatter_agreed(self, name: str, value: Tensor) -> None:
        """Write ``value`` into state ``name`` and into its agreed state ``_base_<name>``."""
        self.scatter(name, value)
        self.scatter(f"_base_{name}", value)

    def flush(self) -> None:
        """Apply every queued :meth:`scatter` in one foreach copy."""
        bufs, parts = self._pending
        if bufs:
            torch._foreach_copy_(bufs, parts)
        self._pending = ([], [])
