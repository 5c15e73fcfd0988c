"""The wire format of :func:`~statplug.distributed.sync_metrics`: pure packing and unpacking.

One rank's metric states become (see :class:`Payload`):

* ``sums``: one float64 vector, SUM-reduced: every ``"sum"``/``"mean"`` state (int64 states as
  two exact 32-bit halves, smaller integers and bool as they are: float64 holds them exactly);
* ``maxes``: one float64 vector, MAX-reduced: every floating ``"max"``/``"min"`` state (minima
  negated), then a NaN flag per element (torch's ``max``/``min`` propagate NaN, a MAX does not);
* ``blob``: int64 words, all-gathered (each rank's row padded to the longest): the bytes of the
  states no reduce op covers (integer max/min, ``None`` ...), then the ``"cat"`` list states
  behind a header that gives each one's dtype and shape.

Before them goes one fixed-size float64 MAX, the :func:`check_vector`: the layout fingerprint and
the number of stats synced alongside as ``[v, -v]`` (equal on every rank iff max == -max(-v)),
and each rank's blob length in its own slot. Nothing here makes a collective: a test reduces
the payloads of several ranks by hand and unpacks them in one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from statplug._compat import metric_reduction
from statplug.distributed.metrics_plan import MetricsPlan, Slot, torchmetrics_parts

__all__ = ["CheckResult", "Payload", "check_vector", "gather_row", "pack", "read_check", "unpack"]

_F64 = torch.float64
_LOW32 = 0xFFFFFFFF
_ALIGN = 16  # bytes: every gathered segment starts here, so a byte view can become any dtype
# Every torch dtype, in an order every rank shares: cat states name theirs by index.
_DTYPES = tuple(sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str))
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_EMPTY = -1  # dtype code of a cat state with no data on a rank
_CHECKED = 3  # entries compared across ranks: fingerprint (2 halves), number of stats


@dataclass
class Payload:
    """What one rank sends: each part None when the plan has no state of its kind."""

    sums: Tensor | None
    maxes: Tensor | None
    blob: Tensor | None

    @property
    def n_blob_words(self) -> int:
        return 0 if self.blob is None else self.blob.numel()


@dataclass(frozen=True)
class CheckResult:
    """What the reduced :func:`check_vector` says."""

    layouts_agree: bool
    stats_agree: bool
    sizes: list[int]  # each rank's blob length in words

    @property
    def width(self) -> int:
        """Words per rank in the gather buffer (even, so every row starts 16-byte aligned)."""
        return -(-max(self.sizes, default=0) // 2) * 2


def check_vector(
    plan: MetricsPlan, n_stats: int, n_words: int, rank: int, world: int, device: torch.device
) -> Tensor:
    """The fixed-size float64 vector every rank MAX-reduces first."""
    hi, lo = plan.fingerprint()
    sizes = [0.0] * world
    sizes[rank] = float(n_words)
    checked = [hi, lo, float(n_stats)]
    return torch.tensor([*checked, *(-v for v in checked), *sizes], dtype=_F64, device=device)


def read_check(reduced: Tensor) -> CheckResult:
    v = reduced.tolist()
    top, neg = v[:_CHECKED], v[_CHECKED : 2 * _CHECKED]
    same = [a == -b for a, b in zip(top, neg, strict=True)]
    return CheckResult(same[0] and same[1], same[2], [int(s) for s in v[2 * _CHECKED :]])


# ------------------------------------------------------------------ packing
def _flat(slots: list[Slot], device: torch.device) -> Tensor:
    return torch.cat([s.value().reshape(-1).to(device) for s in slots])


def _per_element(slots: list[Slot], value: Callable[[Slot], float], device: torch.device
                 ) -> Tensor:
    """A float64 vector with ``value(slot)`` at each element of each slot, in order."""
    return torch.cat([torch.full((s.numel,), value(s), dtype=_F64) for s in slots]).to(device)


def _sign(plan: MetricsPlan, device: torch.device) -> Tensor:
    """+1 for a max state's elements, -1 for a min state's: minima travel negated."""
    return _per_element(plan.slots["max"], lambda s: 1.0 if s.reduce == "max" else -1.0, device)


def _pack_sums(plan: MetricsPlan, device: torch.device) -> Tensor | None:
    parts = []
    if plan.slots["sum_float"]:
        parts.append(_flat(plan.slots["sum_float"], device).to(_F64))
    if plan.slots["sum_i64"]:
        x = _flat(plan.slots["sum_i64"], device)
        parts += [(x >> 32).to(_F64), (x & _LOW32).to(_F64)]
    if plan.slots["sum_int"]:
        parts.append(_flat(plan.slots["sum_int"], device).to(_F64))
    return torch.cat(parts) if parts else None


def _pack_maxes(plan: MetricsPlan, device: torch.device) -> Tensor | None:
    if not plan.slots["max"]:
        return None
    v = _flat(plan.slots["max"], device).to(_F64) * _sign(plan, device)
    nan = v.isnan()
    return torch.cat([v.masked_fill(nan, -torch.inf), nan.to(_F64)])


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


def _pack_cats(plan: MetricsPlan, device: torch.device) -> list[Tensor]:
    """A header (its length, then per cat state: dtype code, ndim, shape), then the data."""
    header: list[int] = []
    data = []
    for s in plan.slots["cat"]:
        items = s.value()
        if not items:
            header += [_EMPTY, 0]
            continue
        local = torchmetrics_parts().cat(items)
        header += [_DTYPE_CODE[local.dtype], local.dim(), *local.shape]
        data.append(_to_words(local.to(device)))
    header += [0] * (len(header) % 2 == 0)  # 1 + len even: the data stays 16-byte aligned
    return [torch.tensor([len(header), *header], dtype=torch.int64, device=device), *data]


def pack(plan: MetricsPlan, device: torch.device) -> Payload:
    """This rank's payload, every tensor on ``device`` and contiguous."""
    blob = [_to_words(s.value().to(device)) for s in plan.slots["gather"]]
    if plan.slots["cat"]:
        blob += _pack_cats(plan, device)
    return Payload(_pack_sums(plan, device), _pack_maxes(plan, device),
                   torch.cat(blob) if blob else None)


def gather_row(payload: Payload, width: int, device: torch.device) -> Tensor:
    """This rank's row of the gather buffer: its blob, zero-padded to ``width`` words."""
    row = torch.zeros(width, dtype=torch.int64, device=device)
    if payload.blob is not None:
        row[: payload.blob.numel()] = payload.blob
    return row


# ------------------------------------------------------------------ unpacking
Results = list[tuple[Slot, Any]]


def _split(flat: Tensor, slots: list[Slot], convert: Callable[[Tensor, torch.dtype], Tensor]
           ) -> Iterator[tuple[Slot, Tensor]]:
    """Cut a reduced segment into the slots' states, converting each run of one dtype at once."""
    start = i = 0
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


def _unpack_sums(plan: MetricsPlan, sums: Tensor, world: int) -> Results:
    floats, i64, small = plan.slots["sum_float"], plan.slots["sum_i64"], plan.slots["sum_int"]
    n = sum(s.numel for s in floats)
    seg = sums[:n]
    if any(s.reduce == "mean" for s in floats):  # torchmetrics' mean over ranks
        seg = seg / _per_element(floats, lambda s: world if s.reduce == "mean" else 1.0,
                                 sums.device)
    out = list(_split(seg, floats, lambda t, d: t.to(d)))
    if i64:
        k = sum(s.numel for s in i64)
        hi, lo = sums[n : n + k].to(torch.int64), sums[n + k : n + 2 * k].to(torch.int64)
        out += _split((hi << 32) + lo, i64, lambda t, d: t)  # wraps as torch's int64 sum does
        n += 2 * k
    if small:  # torch.sum of integers and bool gives int64, as torchmetrics' sum over ranks
        out += _split(sums[n:], small, lambda t, d: t.to(torch.int64))
    return out


def _unpack_maxes(plan: MetricsPlan, maxes: Tensor) -> Results:
    n = maxes.numel() // 2
    v = maxes[:n].masked_fill(maxes[n:] > 0, torch.nan) * _sign(plan, maxes.device)
    return list(_split(v, plan.slots["max"], lambda t, d: t.to(d)))


def _unpack_gathered(plan: MetricsPlan, buf: Tensor) -> Results:
    """``buf``: [world, width] int64, every rank's row."""
    world, off, out = buf.shape[0], 0, []
    for s in plan.slots["gather"]:
        n_bytes = s.numel * s.dtype.itemsize
        w = _words(n_bytes)
        raw = buf[:, off : off + w].contiguous().view(torch.uint8)[:, :n_bytes].contiguous()
        stacked = raw.view(s.dtype).view(world, *s.shape).to(s.device)
        fn = metric_reduction(s.metric, s.attr)  # None, or one of torchmetrics' dim_zero_*
        out.append((s, fn(stacked) if callable(fn) else stacked))
        off += w
    if plan.slots["cat"]:
        out += _unpack_cats(plan.slots["cat"], buf, off)
    return out


def _unpack_cats(cats: list[Slot], buf: Tensor, off: int) -> Results:
    lengths = buf[:, off].tolist()
    headers = buf[:, off + 1 : off + 1 + max(lengths)].tolist()
    rows = buf.view(torch.uint8)  # [world, bytes]
    parts: list[list[Tensor]] = [[] for _ in cats]
    for r, header in enumerate(headers):
        pos, data = 0, 8 * (off + 1 + lengths[r])
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
    out: Results = []
    for s, got in zip(cats, parts, strict=True):
        local = s.value()
        device = local[0].device if local else s.metric.device
        # In rank order, as torchmetrics' gather and cat give them.
        value = torch.cat(got).to(device) if got else torch.tensor(
            [], dtype=s.metric.dtype, device=device)
        out.append((s, value))
    return out


def unpack(plan: MetricsPlan, reduced: Payload, gathered: Tensor | None, world: int) -> Results:
    """Every coalesced state's global value, from the reduced ``sums`` and ``maxes`` and the
    ``[world, width]`` gathered rows (None when no rank had a blob)."""
    out: Results = []
    if reduced.sums is not None:
        out += _unpack_sums(plan, reduced.sums, world)
    if reduced.maxes is not None:
        out += _unpack_maxes(plan, reduced.maxes)
    if gathered is not None:
        out += _unpack_gathered(plan, gathered)
    return out
