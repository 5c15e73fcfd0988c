"""Coalesced sync of torchmetrics metrics: :func:`sync_metrics`.

torchmetrics syncs when a metric computes, state by state: ``gather_all_tensors`` makes a
barrier, an ``all_gather`` of sizes and an ``all_gather`` of data for every state of every
metric. :func:`sync_metrics` gives every metric its global state in at most 4 collectives,
whatever the number of metrics:

1. the layout check: one fixed-size float64 MAX carrying the metrics' layout fingerprint
   (classes, state names, reductions, shapes, dtypes) as ``[v, -v]`` and, in each rank's own
   slot, the size of its variable-size data (the stats' layout check when synced with stats);
2. one float64 SUM of every ``"sum"``/``"mean"`` state (int64 states as two exact 32-bit halves);
3. one float64 MAX of every floating ``"max"``/``"min"`` state (minima negated, NaN as a flag:
   torch's ``max``/``min`` propagate NaN, a MAX all-reduce does not);
4. one ``all_gather`` of every rank's ``"cat"`` list states and of the tensor states no reduce
   op covers (integer max/min, ``None`` ...), padded to the largest rank's, into one buffer;
   torchmetrics' own reduction then runs on the gathered values.

2-4 start together once 1 has arrived. A state whose ``dist_reduce_fx`` is a custom callable, a
metric with its own ``dist_sync_fn`` or ``_sync_dist``: that metric alone is synced by
torchmetrics' own ``sync`` (the report names it). torchmetrics is imported only when metrics
exist, so ``import statplug`` stays light.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from statplug._compat import metric_reduction
from statplug.distributed import sync as _engine  # rewritten; this module follows (issue 21.5)
from statplug.distributed.sync import find_stats as _find_stats

HeldPlan = object
_fingerprint = _raise_layout_error = _sync = layout_check_result = layout_check_vector = (
    getattr(_engine, "_missing", None)
)
from statplug.errors import StatplugError
from statplug.stats.base import Stat

if TYPE_CHECKING:
    from torchmetrics import Metric

__all__ = ["MetricsSyncReport", "find_metrics", "sync_metrics"]

_F64 = torch.float64
_LOW32 = 0xFFFFFFFF
_ALIGN = 16  # bytes: every gathered segment starts here, so a byte view can become any dtype
# Every torch dtype, in an order every rank shares: cat states name theirs by index.
_DTYPES = tuple(sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str))
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_EMPTY = -1  # dtype code of a cat state with no data on a rank


@dataclass(frozen=True)
class MetricsSyncReport:
    """What one :func:`sync_metrics` did.

    Attributes:
        n_metrics: metrics holding their global state inside the context.
        n_stats: stats merged in the same collectives (``stats=``), else 0.
        n_collectives: collective calls statplug made (0 when there is nothing to sync with),
            the stats' included when synced together; the ``fallback`` metrics' own not counted.
        n_bytes: payload bytes this rank contributed to those collectives.
        seconds: wall time of the sync on this rank.
        fallback: metrics synced by torchmetrics' own ``sync`` (custom reduce or sync function).
        skipped: metrics left local: as torchmetrics' ``compute`` would (``sync_on_compute=False``,
            or their ``distributed_available_fn`` says no), or whose own process group has one
            rank or does not hold this one.
    """

    n_metrics: int
    n_stats: int
    n_collectives: int
    n_bytes: int
    seconds: float
    fallback: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


MetricsLike = nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module]


def find_metrics(metrics: MetricsLike) -> list[tuple[str, Metric]]:
    """Every torchmetrics ``Metric`` in a module, an iterable or a mapping of name to module
    (``MetricCollection``\\ s and metrics inside metrics included), once each, with its name."""
    items: list[tuple[str, Any]]
    if isinstance(metrics, nn.Module):
        items = [("", metrics)]
    elif isinstance(metrics, Mapping):
        items = list(metrics.items())
    else:
        items = [("", m) for m in metrics]
    tm = sys.modules.get("torchmetrics.metric")  # not imported yet: no metric can exist
    metric_cls = None if tm is None else tm.Metric
    found: list[tuple[str, Metric]] = []
    seen: set[int] = set()

    def walk(name: str, module: nn.Module) -> None:
        # named_modules' walk and names, with a memo by id: it hashes modules, and a Metric's
        # __hash__ hashes its states.
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, metric_cls):  # type: ignore[arg-type]
            found.append((name or f"{type(module).__name__}#{len(found)}", module))
        for child_name, child in module._modules.items():
            if child is not None:
                walk(f"{name}.{child_name}" if name else child_name, child)

    for key, item in items:
        if not isinstance(item, nn.Module):
            raise TypeError(
                f"sync_metrics: expected a module, or an iterable or mapping of modules "
                f"(torchmetrics metrics), got an item of type {type(item).__name__}"
            )
        if metric_cls is not None:
            walk(key, item)
    return found


@functools.cache
def _torchmetrics() -> tuple[type[Metric], dict[Callable[..., Any], str], Callable[..., Any], Any]:
    """torchmetrics' Metric class, its reduce functions by name, its cat, and its default
    ``distributed_available_fn``."""
    from torchmetrics.metric import Metric, jit_distributed_available
    from torchmetrics.utilities import data

    names = {
        data.dim_zero_sum: "sum",
        data.dim_zero_mean: "mean",
        data.dim_zero_max: "max",
        data.dim_zero_min: "min",
        data.dim_zero_cat: "cat",
    }
    return Metric, names, data.dim_zero_cat, jit_distributed_available


def _default_available(fn: Any) -> bool:
    """Is ``fn`` torchmetrics' default check (true whenever we get to sync)?"""
    return fn is None or fn is _torchmetrics()[3]


# ------------------------------------------------------------------ routes
# Where a state travels. "sum_float"/"max": float64 SUM/MAX; "sum_i64": SUM of two 32-bit halves;
# "sum_int": smaller integers and bool, exact in float64; "gather": fixed-size bytes gathered,
# reduced with torchmetrics' own function; "cat": list states, variable size; "fallback": the
# metric goes through torchmetrics' own sync.
def _route(reduce: str | None, value: Any) -> str:
    if isinstance(value, list):
        return "cat" if reduce == "cat" else "fallback"
    if not isinstance(value, Tensor) or reduce not in (None, "sum", "mean", "max", "min", "cat"):
        return "fallback"  # a custom reduce function
    dtype = value.dtype
    if reduce in ("sum", "mean") and dtype.is_floating_point:
        return "sum_float"
    if reduce == "sum" and dtype == torch.int64:
        return "sum_i64"
    if reduce == "sum" and dtype in (torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        return "sum_int"
    if reduce in ("max", "min") and dtype.is_floating_point:
        return "max"
    return "gather"


Setter = Callable[[Any, str, Any], None]


def _setter(m: Metric) -> Setter:
    """How to write ``m``'s states and sync flags: a plain attribute write where ``setattr``
    would end in exactly that (``nn.Module.__setattr__`` costs ~10 us a call, a sync makes ~14
    per metric): no ``__setattr__`` of its own and no state registered as a parameter, buffer or
    module."""
    plain = type(m).__setattr__ is _torchmetrics()[0].__setattr__ and not any(
        a in m._parameters or a in m._buffers or a in m._modules for a in m._defaults
    )
    return object.__setattr__ if plain else setattr


@dataclass(frozen=True)
class _Slot:
    """One state of one metric and how it travels."""

    metric: Metric
    put: Setter  # how to write the metric's attributes (see _setter)
    attr: str
    route: str
    reduce: str | None
    dtype: torch.dtype
    shape: torch.Size
    device: torch.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def describe(self) -> str:
        """The state's part of the layout fingerprint."""
        kind = "list" if isinstance(getattr(self.metric, self.attr), list) else (
            f"{self.dtype}{tuple(self.shape)}")
        return f"{self.attr}:{self.reduce}:{kind}"


def _signature(named: list[tuple[str, Metric]], group: Any, world: int) -> tuple[Any, ...]:
    """Everything a plan depends on, cheap to make (no strings): a changed one rebuilds it.
    Refuses a metric that is synced already (its local state would be lost)."""
    sig: list[Any] = [id(group), world]
    for name, m in named:
        if m._is_synced:
            raise StatplugError(
                f"sync_metrics: metric `{name}` ({type(m).__name__}) is already synced (inside "
                "another sync_metrics block or torchmetrics' sync_context); leave that first"
            )
        sig.append((id(m), m._to_sync, m.dist_sync_fn is None, id(m.process_group)))
        if not _default_available(m.distributed_available_fn):
            sig.append(bool(m.distributed_available_fn()))
        for attr in m._reductions:
            v = getattr(m, attr)
            sig.append(0 if isinstance(v, list) else (v.dtype, v.shape, v.device))
    return tuple(sig)


def _slots_of(m: Metric, put: Setter) -> list[_Slot]:
    reduce_names = _torchmetrics()[1]
    slots = []
    for attr, fn in m._reductions.items():
        reduce = None if fn is None else reduce_names.get(fn, "custom") if callable(fn) else str(fn)
        v = getattr(m, attr)
        if isinstance(v, list):  # its dtype and shape are only known once data arrives
            slots.append(
                _Slot(m, put, attr, _route(reduce, v), reduce, m.dtype, torch.Size(), m.device)
            )
        else:
            slots.append(_Slot(m, put, attr, _route(reduce, v), reduce, v.dtype, v.shape, v.device))
    return slots


def _kind_of(m: Metric, slots: list[_Slot]) -> str:
    """"skip" where torchmetrics' compute would not sync, "fallback" where its own sync must
    run (a custom reduce or sync function, an overridden ``_sync_dist``), else "coalesced"."""
    if not m._to_sync or not (
        _default_available(m.distributed_available_fn) or m.distributed_available_fn()
    ):
        return "skip"
    own_sync = type(m)._sync_dist is not _torchmetrics()[0]._sync_dist and bool(slots)
    if own_sync or m.dist_sync_fn is not None or any(s.route == "fallback" for s in slots):
        return "fallback"
    return "coalesced"


def _per_element(slots: list[_Slot], value: Callable[[_Slot], float], device: torch.device
                 ) -> Tensor:
    """A float64 vector with ``value(slot)`` at each element of each slot, in order."""
    return torch.cat([torch.full((s.numel,), value(s), dtype=_F64) for s in slots]).to(device)


class _Plan(HeldPlan):
    """How one set of metrics syncs over one group: cached between syncs on the first metric
    (see :class:`~statplug.distributed.sync.HeldPlan`)."""

    def __init__(self, named: list[tuple[str, Metric]], world: int) -> None:
        self.named: list[tuple[str, Metric]] = []  # the set it was made for (set by _plan_for)
        self.signature: tuple[Any, ...] = ()
        self.world = world
        self.layout: list[str] = []
        self.coalesced: list[tuple[str, Metric]] = []
        self.fallback: list[tuple[str, Metric]] = []
        self.skipped: list[tuple[str, Metric]] = []
        self.slots: dict[str, list[_Slot]] = {
            r: [] for r in ("sum_float", "sum_i64", "sum_int", "max", "gather", "cat")
        }
        self.setters: list[Setter] = []  # of the coalesced metrics
        lists = {"skip": self.skipped, "fallback": self.fallback, "coalesced": self.coalesced}
        for name, m in named:
            put = _setter(m)
            slots = _slots_of(m, put)
            kind = _kind_of(m, slots)
            lists[kind].append((name, m))
            if kind == "coalesced":
                self.setters.append(put)
                for slot in slots:
                    self.slots[slot.route].append(slot)
            cls = type(m)
            states = ", ".join(slot.describe() for slot in slots)
            self.layout.append(f"{name}: {cls.__module__}.{cls.__qualname__} {kind} [{states}]")
        self.fingerprint = _fingerprint(self.layout)
        # Runs of one dtype are converted back in one op each.
        for route in ("sum_float", "max"):
            self.slots[route].sort(key=lambda slot: str(slot.dtype))
        # Where the payload is packed: the metrics' device (torchmetrics keeps it up to date).
        device = self.coalesced[0][1].device if self.coalesced else torch.device("cpu")
        self.device = device
        sums, maxes = self.slots["sum_float"], self.slots["max"]
        # "mean" states are divided by the world size, as torchmetrics' mean over ranks does.
        self.divisor = (
            _per_element(sums, lambda slot: world if slot.reduce == "mean" else 1.0, device)
            if any(slot.reduce == "mean" for slot in sums) else None
        )
        self.sign = (  # minima travel negated in the MAX
            _per_element(maxes, lambda slot: 1.0 if slot.reduce == "max" else -1.0, device)
            if maxes else None
        )


def _words(n_bytes: int) -> int:
    """int64 words holding ``n_bytes`` with every segment aligned to :data:`_ALIGN`."""
    return -(-n_bytes // _ALIGN) * (_ALIGN // 8)


def _to_words(t: Tensor) -> Tensor:
    """The bytes of ``t`` as int64 words, zero-padded to :data:`_ALIGN`."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = _words(raw.numel()) * 8 - raw.numel()
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(torch.int64)


# Kept on the first metric of the set, never module-global: a plan lives (and keeps its
# metrics alive) only as long as that metric.
_PLAN_ATTR = "_statplug_metrics_plan"


def _plan_for(named: list[tuple[str, Metric]], group: Any, world: int) -> _Plan:
    holder = named[0][1]
    sig = _signature(named, group, world)
    held = holder.__dict__.get(_PLAN_ATTR)
    # Everything the check needs lives in the plan, which copies and pickles drop. Metrics are
    # compared by identity: a Metric's == builds a CompositionalMetric.
    if (
        isinstance(held, _Plan)
        and held.signature == sig
        and [(n, id(m)) for n, m in held.named] == [(n, id(m)) for n, m in named]
    ):
        return held
    plan = _Plan(named, world)
    plan.signature, plan.named = sig, list(named)
    holder.__dict__[_PLAN_ATTR] = plan
    return plan


# ------------------------------------------------------------------ one exchange
def _split(flat: Tensor, slots: list[_Slot], convert: Callable[[Tensor, torch.dtype], Tensor]
           ) -> Iterator[tuple[_Slot, Tensor]]:
    """Cut a reduced segment into the slots' states, converting each run of one dtype at once."""
    start = 0
    i = 0
    while i < len(slots):
        j = i
        while j < len(slots) and slots[j].dtype == slots[i].dtype:
            j += 1
        run = slots[i:j]
        n = sum(s.numel for s in run)
        pieces = convert(flat[start : start + n], run[0].dtype).split([s.numel for s in run])
        for s, p in zip(run, pieces, strict=True):
            yield s, p.view(s.shape).to(s.device)
        start += n
        i = j


class _Exchange:
    """The sync of one plan's metrics over one group: also the rider that travels in
    :func:`sync_stats`' collectives when stats and metrics sync together (see ``SyncRider``)."""

    def __init__(self, plan: _Plan, group: Any) -> None:
        self.plan, self.group = plan, group
        self.world = plan.world
        self.rank = dist.get_rank(group)
        self.device = plan.device
        self.results: list[tuple[_Slot, Any]] = []  # each state's global value
        self.n_bytes = 0
        self.sizes: list[int] = []
        self.rode = False
        self._gather_work: tuple[Any, Tensor] | None = None
        self.blob = self._blob()

    # -------------------------------------------------------------- local packing
    def _blob(self) -> Tensor | None:
        """This rank's gathered data as int64 words: the fixed-size "gather" states, then a
        header (length, then per cat state: dtype code, ndim, shape) and the cat data."""
        plan = self.plan
        parts = [_to_words(getattr(s.metric, s.attr).to(self.device)) for s in plan.slots["gather"]]
        cats = plan.slots["cat"]
        if cats:
            dim_zero_cat = _torchmetrics()[2]
            header: list[int] = []
            data = []
            for s in cats:
                items = getattr(s.metric, s.attr)
                if not items:
                    header += [_EMPTY, 0]
                    continue
                local = dim_zero_cat(items)
                header += [_DTYPE_CODE[local.dtype], local.dim(), *local.shape]
                data.append(_to_words(local.to(self.device)))
            header += [0] * (len(header) % 2 == 0)  # 1 + len even: the data stays 16-byte aligned
            parts.append(torch.tensor([len(header), *header], dtype=torch.int64,
                                      device=self.device))
            parts += data
        return torch.cat(parts) if parts else None

    def layout_extra(self) -> Tensor:
        hi, lo = self.plan.fingerprint
        sizes = [0.0] * self.world  # each rank's own slot: the MAX gives every rank's
        sizes[self.rank] = 0.0 if self.blob is None else float(self.blob.numel())
        self.n_bytes += (4 + self.world) * 8
        return torch.tensor([hi, lo, -hi, -lo, *sizes], dtype=_F64, device=self.device)

    def check_layout(self, reduced: Tensor) -> None:
        values = reduced.tolist()
        hi, lo, neg_hi, neg_lo = values[:4]
        if hi != -neg_hi or lo != -neg_lo:  # max != min: some rank holds another layout
            _raise_metric_layout_error(self.plan.layout, self.group)
        self.sizes = [int(v) for v in values[4:]]

    def phase1(self) -> tuple[Tensor | None, Tensor | None]:
        plan = self.plan
        parts = []
        floats = plan.slots["sum_float"]
        if floats:
            parts.append(self._cat(floats).to(_F64))
        if plan.slots["sum_i64"]:
            x = self._cat(plan.slots["sum_i64"])
            parts += [(x >> 32).to(_F64), (x & _LOW32).to(_F64)]
        if plan.slots["sum_int"]:
            parts.append(self._cat(plan.slots["sum_int"]).to(_F64))
        sums = torch.cat(parts) if parts else None
        maxes = None
        if plan.slots["max"]:
            assert plan.sign is not None
            v = self._cat(plan.slots["max"]).to(_F64) * plan.sign
            nan = v.isnan()
            maxes = torch.cat([v.masked_fill(nan, -torch.inf), nan.to(_F64)])
        self.n_bytes += sum(0 if t is None else t.numel() * 8 for t in (sums, maxes))
        return sums, maxes

    def _cat(self, slots: list[_Slot]) -> Tensor:
        return torch.cat([getattr(s.metric, s.attr).reshape(-1).to(self.device) for s in slots])

    # -------------------------------------------------------------- gathered data
    @property
    def _width(self) -> int:
        """Words per rank in the gather buffer (even, so every row starts 16-byte aligned)."""
        return -(-max(self.sizes, default=0) // 2) * 2

    def _own_row(self) -> Tensor:
        row = torch.zeros(self._width, dtype=torch.int64, device=self.device)
        if self.blob is not None:
            row[: self.blob.numel()] = self.blob
        return row

    def start_gather(self) -> bool:
        """Start the all_gather of every rank's data into one buffer; False if none has any."""
        if self._width == 0:
            return False
        buf = torch.empty(self.world, self._width, dtype=torch.int64, device=self.device)
        work = dist.all_gather(list(buf.unbind(0)), self._own_row(), group=self.group,
                               async_op=True)
        self._gather_work = (work, buf)
        self.n_bytes += self._width * 8
        return True

    def phase2(self, runs: bool) -> Tensor | None:
        """When the stats' second SUM runs anyway, the gathered data rides in it: each rank
        writes its words, as exact 32-bit halves, into its own slot and zeros elsewhere."""
        if not runs or self._width == 0:
            return None
        halves = (self._own_row().view(torch.int32).to(torch.int64) & _LOW32).to(_F64)
        slots = torch.zeros(self.world, halves.numel(), dtype=_F64, device=self.device)
        slots[self.rank] = halves
        self.rode = True
        self.n_bytes += slots.numel() * 8
        return slots.reshape(-1)

    def finish(self, sums: Tensor | None, maxes: Tensor | None, sums2: Tensor | None) -> int:
        n_coll = 0
        buf = None
        if self.rode:
            assert sums2 is not None
            halves = sums2.to(torch.int64).view(self.world, -1, 2)
            buf = (halves[..., 0] | (halves[..., 1] << 32)).contiguous()
        else:
            if self._gather_work is None and self.start_gather():
                n_coll += 1
            if self._gather_work is not None:
                work, buf = self._gather_work
                work.wait()
        self._decode_sums(sums)
        self._decode_maxes(maxes)
        if buf is not None:
            self._decode_gathered(buf)
        return n_coll

    # -------------------------------------------------------------- decoding
    def _decode_sums(self, sums: Tensor | None) -> None:
        if sums is None:
            return
        plan, out = self.plan, self.results
        floats = plan.slots["sum_float"]
        n = sum(s.numel for s in floats)
        seg = sums[:n] if plan.divisor is None else sums[:n] / plan.divisor
        out += _split(seg, floats, lambda t, d: t.to(d))
        if plan.slots["sum_i64"]:
            k = sum(s.numel for s in plan.slots["sum_i64"])
            hi, lo = sums[n : n + k].to(torch.int64), sums[n + k : n + 2 * k].to(torch.int64)
            total = (hi << 32) + lo  # wraps past int64 as torch's int64 sum does
            out += _split(total, plan.slots["sum_i64"], lambda t, d: t)
            n += 2 * k
        if plan.slots["sum_int"]:
            # torch.sum of integers and bool gives int64, as torchmetrics' sum over ranks does.
            out += _split(sums[n:], plan.slots["sum_int"], lambda t, d: t.to(torch.int64))

    def _decode_maxes(self, maxes: Tensor | None) -> None:
        if maxes is None:
            return
        plan = self.plan
        assert plan.sign is not None
        n = plan.sign.numel()
        v = maxes[:n].masked_fill(maxes[n:] > 0, torch.nan) * plan.sign
        self.results += _split(v, plan.slots["max"], lambda t, d: t.to(d))

    def _decode_gathered(self, buf: Tensor) -> None:
        plan, world = self.plan, self.world
        off = 0
        for s in plan.slots["gather"]:
            n_bytes = s.numel * s.dtype.itemsize
            w = _words(n_bytes)
            raw = buf[:, off : off + w].contiguous().view(torch.uint8)[:, :n_bytes].contiguous()
            stacked = raw.view(s.dtype).view(world, *s.shape).to(s.device)
            fn = metric_reduction(s.metric, s.attr)  # None, or one of torchmetrics' dim_zero_*
            self.results.append((s, fn(stacked) if callable(fn) else stacked))
            off += w
        if plan.slots["cat"]:
            self._decode_cats(buf, off)

    def _decode_cats(self, buf: Tensor, off: int) -> None:
        cats = self.plan.slots["cat"]
        lengths = buf[:, off].tolist()
        headers = buf[:, off + 1 : off + 1 + max(lengths)].tolist()
        rows = buf.view(torch.uint8)  # [world, bytes]
        parts: list[list[Tensor]] = [[] for _ in cats]
        for r in range(self.world):
            header, pos, data = headers[r], 0, 8 * (off + 1 + lengths[r])
            for i in range(len(cats)):
                code, ndim = header[pos], header[pos + 1]
                shape = header[pos + 2 : pos + 2 + ndim]
                pos += 2 + ndim
                if code == _EMPTY:
                    continue  # no data on rank r (torchmetrics would add an empty float tensor)
                dtype = _DTYPES[code]
                n_bytes = math.prod(shape) * dtype.itemsize
                parts[i].append(rows[r, data : data + n_bytes].view(dtype).view(shape))
                data += 8 * _words(n_bytes)
        for s, got in zip(cats, parts, strict=True):
            local = getattr(s.metric, s.attr)
            device = local[0].device if local else s.metric.device
            # In rank order, as torchmetrics' gather and cat give them.
            value = torch.cat(got).to(device) if got else torch.tensor(
                [], dtype=s.metric.dtype, device=device)
            self.results.append((s, value))


def _raise_metric_layout_error(layout: list[str], group: Any) -> None:
    _raise_layout_error(
        layout, group, what="metric", caller="sync_metrics",
        fix="build, log and sync the same metrics in the same order",
    )


def _no_stats_check(device: torch.device, extra: Tensor) -> Tensor:
    """What the stats' layout check sends for a rank with no stats, so a rank with stats and
    one without meet in collectives of the same size and both raise."""
    empty = torch.tensor(_EMPTY_STATS, dtype=_F64, device=device)
    return layout_check_vector(empty, None, extra)


_EMPTY_STATS = (0.0, 0.0)  # placeholder until the rewrite lands


def _exchange_alone(ex: _Exchange) -> int:
    """The metrics' exchange without stats: the layout check, then SUM, MAX and the gather
    together. Returns the number of collectives."""
    group = ex.group
    extra = ex.layout_extra()
    t = _no_stats_check(ex.device, extra)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if not layout_check_result(t)[0]:  # another rank holds stats: join its error path
        _raise_layout_error([], group)
    ex.check_layout(t[t.numel() - extra.numel() :])
    sums, maxes = ex.phase1()
    n_coll = 1 + int(ex.start_gather())
    works = []
    for payload, op in ((sums, dist.ReduceOp.SUM), (maxes, dist.ReduceOp.MAX)):
        if payload is not None:
            works.append(dist.all_reduce(payload, op=op, group=group, async_op=True))
    for w in works:
        w.wait()
    return n_coll + len(works) + ex.finish(sums, maxes, None)


# ------------------------------------------------------------------ entering and leaving
@dataclass
class _Entered:
    """What leaving the context must undo."""

    coalesced: list[tuple[Metric, Setter, dict[str, Any]]] = field(default_factory=list)
    fallback: list[Metric] = field(default_factory=list)
    flags: list[tuple[Metric, Setter, bool, bool]] = field(default_factory=list)

    def hold_local(self, metrics: Iterable[tuple[Metric, Setter]]) -> None:
        """compute() inside uses the state the metric holds and syncs nothing itself."""
        for m, put in metrics:
            self.flags.append((m, put, m._to_sync, m._should_unsync))
            put(m, "_to_sync", False)
            put(m, "_should_unsync", False)
            put(m, "_computed", None)


def _enter(exchanges: list[_Exchange], fallback: list[Metric], group: Any, state: _Entered
           ) -> None:
    for m in fallback:
        # torchmetrics' own sync (caches the local state, as its compute would).
        m.sync(dist_sync_fn=m.dist_sync_fn, process_group=m.process_group or group,
               distributed_available=m.distributed_available_fn)
        state.fallback.append(m)
    for ex in exchanges:
        # As torchmetrics' sync: the local state is cached, the global one set.
        setters = ex.plan.setters
        caches = [(m, put, {a: getattr(m, a) for a in m._defaults})
                  for (_, m), put in zip(ex.plan.coalesced, setters, strict=True)]
        state.coalesced += caches
        for slot, value in ex.results:
            slot.put(slot.metric, slot.attr, value)
        for m, put, cache in caches:
            put(m, "_cache", cache)
            put(m, "_is_synced", True)
    state.hold_local([(m, put) for m, put, _ in state.coalesced]
                     + [(m, setattr) for m in state.fallback])


def _leave(state: _Entered) -> None:
    """Back to the local states, exactly as torchmetrics' ``unsync`` leaves a metric."""
    for m, put, to_sync, should_unsync in state.flags:
        put(m, "_to_sync", to_sync)
        put(m, "_should_unsync", should_unsync)
    for m, put, cache in state.coalesced:
        # A metric reset (or unsynced) inside keeps that state, as in torchmetrics' sync_context.
        if m._is_synced and m._cache is cache:
            for attr, value in cache.items():
                put(m, attr, value)
            put(m, "_is_synced", False)
            put(m, "_cache", None)
    for m in state.fallback:
        if m._is_synced:
            m.unsync()


def _distributed(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


@contextmanager
def sync_metrics(
    metrics: MetricsLike,
    group: dist.ProcessGroup | None = None,
    *,
    stats: nn.Module | Iterable[Stat] | None = None,
) -> Iterator[MetricsSyncReport]:
    """Inside the ``with`` block every torchmetrics metric holds its global state.

    ``compute()`` inside makes no collective of its own; on exit every metric is back to its
    local state, exactly as after torchmetrics' own sync and unsync, so further ``update``\\ s,
    another sync and ``reset`` behave as they would with torchmetrics alone (a value computed
    inside stays cached, as torchmetrics caches it, until the next ``update`` or ``reset``). At
    most 4 collectives per process group for any number of metrics (see the module docstring);
    results equal torchmetrics' own distributed ``compute()`` -- bit for bit for integer, max,
    min and cat states; float sums are reduced in float64 and rounded once, which on 3 or more
    ranks can differ from torchmetrics' float32 accumulation in the last bit. A no-op when
    ``torch.distributed`` is not initialised or the group has one rank.

    Metrics with ``sync_on_compute=False`` stay local; a metric with a ``process_group`` of its
    own syncs over it (one more exchange per such group); one with a custom ``dist_reduce_fx``
    callable, ``dist_sync_fn`` or ``_sync_dist`` is synced by torchmetrics' own ``sync`` (listed
    in ``report.fallback``).

    Args:
        metrics: a module (every ``torchmetrics.Metric`` inside, ``MetricCollection``\\ s
            included), or an iterable or a mapping (name to metric) of them.
        group: the process group for metrics without their own. Default: the world.
        stats: statplug stats (a module or an iterable) merged in the same collectives, as
            :func:`sync_stats` would merge them -- for good, not only inside the block.
            Default: None.

    Yields:
        A :class:`MetricsSyncReport`.

    Raises:
        StatLayoutError: on every rank, when ranks hold different metrics (or stats).

    Example:
        >>> import torch
        >>> from torchmetrics import MeanMetric
        >>> from statplug import sync_metrics
        >>> mean = MeanMetric()
        >>> mean.update(torch.tensor([1.0, 2.0, 6.0]))
        >>> with sync_metrics([mean]) as report:   # not distributed here: nothing to do
        ...     value = mean.compute()
        >>> value.item(), report.n_collectives
        (3.0, 0)
    """
    start = time.perf_counter()
    named = find_metrics(metrics)
    stat_list = [] if stats is None else _find_stats(stats)
    owner = stats if isinstance(stats, nn.Module) else None  # where the stats' plan is kept
    if not _distributed(group):
        yield _report_alone(named, stat_list, group, start, owner)
        return
    state = _Entered()
    report = _sync_and_enter(named, group, stat_list, state, start, owner)
    try:
        yield report
    finally:
        _leave(state)


def _report_alone(
    named: list[tuple[str, Metric]],
    stat_list: list[Stat],
    group: Any,
    start: float,
    owner: nn.Module | None,
) -> MetricsSyncReport:
    """Nothing to sync metrics with: the stats' sync (a no-op or its own group's) alone."""
    with torch.no_grad():
        stats_report = _sync(stat_list, group, None, start, owner)
    return MetricsSyncReport(len(named), len(stat_list), stats_report.n_collectives,
                             stats_report.n_bytes, time.perf_counter() - start)


def _buckets(
    named: list[tuple[str, Metric]], group: Any
) -> list[tuple[Any, list[tuple[str, Metric]]]]:
    """Metrics by the group they sync over: ``group`` first (even with none), then each metric's
    own process group in order of appearance."""
    out: dict[int, tuple[Any, list[tuple[str, Metric]]]] = {id(group): (group, [])}
    for name, m in named:
        g = m.process_group if m.process_group is not None else group
        out.setdefault(id(g), (g, []))[1].append((name, m))
    return list(out.values())


def _sync_and_enter(
    named: list[tuple[str, Metric]],
    group: Any,
    stat_list: list[Stat],
    state: _Entered,
    start: float,
    owner: nn.Module | None = None,
) -> MetricsSyncReport:
    exchanges: list[_Exchange] = []
    fallback: list[tuple[str, Metric]] = []
    skipped: list[tuple[str, Metric]] = []
    n_coll = n_bytes = 0
    n_stats = len(stat_list)
    try:
        with torch.no_grad():
            for i, (g, bucket) in enumerate(_buckets(named, group)):
                if i > 0 and not _distributed(g):
                    # A group of one, or one this rank is not in: nothing to sync with, and
                    # torchmetrics' own sync would fail there; compute() inside gives the local
                    # value.
                    skipped += bucket
                    state.hold_local((m, setattr) for _, m in bucket)
                    continue
                plan = _plan_for(bucket, g, dist.get_world_size(g))
                ex = _Exchange(plan, g)
                if i == 0 and stat_list:
                    report = _sync(stat_list, g, ex, start, owner)
                    n_coll, n_bytes = n_coll + report.n_collectives, n_bytes + report.n_bytes
                else:
                    n_coll += _exchange_alone(ex)
                    n_bytes += ex.n_bytes
                exchanges.append(ex)
                fallback += plan.fallback
                skipped += plan.skipped
            _enter(exchanges, [m for _, m in fallback], group, state)
    except BaseException:
        _leave(state)  # no metric stays half synced
        raise
    n_metrics = sum(len(ex.plan.coalesced) for ex in exchanges) + len(fallback)
    return MetricsSyncReport(
        n_metrics, n_stats, n_coll, n_bytes, time.perf_counter() - start,
        tuple(n for n, _ in fallback), tuple(n for n, _ in skipped),
    )

