"""What :func:`~statplug.distributed.sync_metrics` syncs and how: find the metrics, sort each
state into the collective it travels in, describe the layout ranks compare.

torchmetrics is imported only when metrics exist, so ``import statplug`` stays light.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from statplug.errors import StatplugError

if TYPE_CHECKING:
    from torchmetrics import Metric

__all__ = [
    "MetricsLike", "MetricsPlan", "Slot", "find_metrics", "plan_metrics", "torchmetrics_parts",
]

MetricsLike = nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module]
Named = list[tuple[str, "Metric"]]

# Where a state travels. "sum_float"/"max": float64 SUM/MAX; "sum_i64": SUM of two 32-bit halves;
# "sum_int": smaller integers and bool, exact in float64; "gather": fixed-size bytes gathered,
# reduced with torchmetrics' own function; "cat": list states, variable size.
ROUTES = ("sum_float", "sum_i64", "sum_int", "max", "gather", "cat")
_SMALL_INTS = (torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


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


@dataclass(frozen=True)
class TorchmetricsParts:
    """The pieces of torchmetrics the sync uses."""

    metric_cls: Any  # torchmetrics.Metric (abstract: mypy refuses type[Metric] for it)
    reduce_names: dict[Callable[..., Any], str]  # its dim_zero_* functions by name
    cat: Callable[..., Tensor]  # dim_zero_cat
    default_available: Callable[..., bool]  # the default ``distributed_available_fn``


@functools.cache
def torchmetrics_parts() -> TorchmetricsParts:
    from torchmetrics.metric import Metric, jit_distributed_available
    from torchmetrics.utilities import data

    names = {
        data.dim_zero_sum: "sum",
        data.dim_zero_mean: "mean",
        data.dim_zero_max: "max",
        data.dim_zero_min: "min",
        data.dim_zero_cat: "cat",
    }
    return TorchmetricsParts(Metric, names, data.dim_zero_cat, jit_distributed_available)


def _route(reduce: str | None, value: Any) -> str | None:
    """The route of a state (see :data:`ROUTES`); None: torchmetrics' own sync must do it."""
    if isinstance(value, list):
        return "cat" if reduce == "cat" else None
    if not isinstance(value, Tensor) or reduce not in (None, "sum", "mean", "max", "min", "cat"):
        return None  # a custom reduce function
    dtype = value.dtype
    if reduce in ("sum", "mean") and dtype.is_floating_point:
        return "sum_float"
    if reduce == "sum" and dtype == torch.int64:
        return "sum_i64"
    if reduce == "sum" and dtype in _SMALL_INTS:
        return "sum_int"
    if reduce in ("max", "min") and dtype.is_floating_point:
        return "max"
    return "gather"


@dataclass(frozen=True)
class Slot:
    """One state of one metric and how it travels (dtype and shape as it is now; a list state
    has the metric's dtype and an empty shape: its items are described on the wire)."""

    metric: Metric
    attr: str
    route: str | None
    reduce: str | None
    dtype: torch.dtype
    shape: torch.Size
    device: torch.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def value(self) -> Any:
        return getattr(self.metric, self.attr)

    def describe(self) -> str:
        kind = "list" if self.route == "cat" else f"{self.dtype}{tuple(self.shape)}"
        return f"{self.attr}:{self.reduce}:{kind}"


def _slots_of(m: Metric) -> list[Slot]:
    reduce_names = torchmetrics_parts().reduce_names
    slots = []
    for attr, fn in m._reductions.items():
        reduce = None if fn is None else reduce_names.get(fn, "custom") if callable(fn) else str(fn)
        v = getattr(m, attr)
        if isinstance(v, list):  # its dtype and shape are only known once data arrives
            slots.append(Slot(m, attr, _route(reduce, v), reduce, m.dtype, torch.Size(), m.device))
        else:
            slots.append(Slot(m, attr, _route(reduce, v), reduce, v.dtype, v.shape, v.device))
    return slots


def _available(m: Metric) -> bool:
    fn = m.distributed_available_fn
    return fn is None or fn is torchmetrics_parts().default_available or bool(fn())


def _kind_of(m: Metric, slots: list[Slot]) -> str:
    """"skip" where torchmetrics' compute would not sync, "fallback" where its own sync must
    run (a custom reduce or sync function, an overridden ``_sync_dist``), else "coalesced"."""
    if not m._to_sync or not _available(m):
        return "skip"
    own_sync = type(m)._sync_dist is not torchmetrics_parts().metric_cls._sync_dist and bool(slots)
    if own_sync or m.dist_sync_fn is not None or any(s.route is None for s in slots):
        return "fallback"
    return "coalesced"


@dataclass
class MetricsPlan:
    """How one group's metrics sync: which are coalesced (their states by route), which go
    through torchmetrics' own sync, which stay local; and the layout ranks must share."""

    coalesced: Named = field(default_factory=list)
    fallback: Named = field(default_factory=list)
    skipped: Named = field(default_factory=list)
    slots: dict[str, list[Slot]] = field(default_factory=lambda: {r: [] for r in ROUTES})
    layout: list[str] = field(default_factory=list)

    def fingerprint(self) -> tuple[float, float]:
        """A 48-bit hash of the layout as two float64-exact 24-bit halves."""
        digest = hashlib.sha256("\n".join(self.layout).encode()).digest()
        h = int.from_bytes(digest[:6], "little")
        return float(h >> 24), float(h & 0xFFFFFF)


def plan_metrics(named: Named) -> MetricsPlan:
    """Sort ``named`` metrics and their states. Refuses a metric that is synced already (its
    local state would be lost)."""
    plan = MetricsPlan()
    lists = {"skip": plan.skipped, "fallback": plan.fallback, "coalesced": plan.coalesced}
    for name, m in named:
        if m._is_synced:
            raise StatplugError(
                f"sync_metrics: metric `{name}` ({type(m).__name__}) is already synced (inside "
                "another sync_metrics block or torchmetrics' sync_context); leave that first"
            )
        slots = _slots_of(m)
        kind = _kind_of(m, slots)
        lists[kind].append((name, m))
        if kind == "coalesced":
            for slot in slots:
                if slot.route is not None:  # always, for a coalesced metric
                    plan.slots[slot.route].append(slot)
        cls = type(m)
        states = ", ".join(slot.describe() for slot in slots)
        plan.layout.append(f"{name}: {cls.__module__}.{cls.__qualname__} {kind} [{states}]")
    for route in ("sum_float", "max"):  # runs of one dtype convert back in one op each
        plan.slots[route].sort(key=lambda slot: str(slot.dtype))
    return plan
