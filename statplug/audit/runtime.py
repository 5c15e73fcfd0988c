"""Runtime audit checks: ``fixed-buffer-mutated`` and ``rank-divergence``.

Both compare cheap fingerprints computed on the tensors' own device: per tensor a float64 vector
(sum, sum of absolute values, a position-weighted sum, and the counts of NaN, +inf and -inf), so a
check costs a few reductions and one host read, never a copy of the state.

**Fixed buffers.** :func:`snapshot_fixed_buffers` records a fingerprint of every buffer that must
not change during training, and :func:`check_fixed_buffers` reports those that did:

* every persistent buffer of a :class:`~statplug.masks.RandomMask` (``mask``, ``seed``). A change
  is accepted when the mask equals the draw from its current ``seed`` (``resample_`` or a loaded
  checkpoint), so only a mask that disagrees with its own seed is reported;
* the derived buffers of :class:`~statplug.masks.CausalMask`,
  :class:`~statplug.encodings.SinusoidalEncoding` and :class:`~statplug.encodings.RotaryEncoding`.
  These regrow (a longer table replaces the cache) and are rebuilt by ``reset_parameters()``; a
  changed one is accepted when it equals what the module builds at its current length.

Both kinds say what they must hold through their public ``expected_buffers()``;
* every buffer named in a module's ``_statplug_fixed_buffers`` (see below). These have no
  generator: any change is reported. After changing one on purpose (e.g. a new pruning round),
  call :meth:`FixedBufferSnapshot.refresh`.

A change found legitimate updates the snapshot, so the next check is cheap again.

The ``_statplug_fixed_buffers`` hook: a module (class or instance attribute) may declare
``_statplug_fixed_buffers: tuple[str, ...]``, the names of its own buffers that are fixed once
registered, e.g. a magnitude-pruning mask::

    linear.register_buffer("weight_mask", mask)
    linear._statplug_fixed_buffers = ("weight_mask",)

**Rank divergence.** :func:`check_rank_divergence` fingerprints every stat's layout (the one the
sync compares) and declared state, and compares ranks with one MAX all-reduce of ``[fp, -fp]``
(the maximum and, negated, the minimum over ranks): a stat whose maximum and minimum differ is not
the same on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from statplug._buffers import (
    FINGERPRINT_MAX_WEIGHT,
    fingerprint,
    named_statplug_modules,
)
from statplug.audit.report import Finding
from statplug.distributed.group import group_device
from statplug.distributed.layout import layout_fingerprint
from statplug.encodings import RotaryEncoding, SinusoidalEncoding
from statplug.masks import CausalMask, RandomMask
from statplug.stats.base import Stat

__all__ = [
    "FixedBufferSnapshot",
    "check_fixed_buffers",
    "check_rank_divergence",
    "fingerprint",
    "snapshot_fixed_buffers",
]

_F64 = torch.float64
_DERIVED_TYPES = (CausalMask, SinusoidalEncoding, RotaryEncoding)
# Fixed buffers of floating dtype may be fingerprinted on another device (or thread count) than at
# the snapshot, which changes the float64 summation order: allow this much relative slack.
_FLOAT_RTOL = 1e-9

Kind = Literal["random", "derived", "marked"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _tolerance(old_fp: Tensor, t: Tensor) -> Tensor:
    """Allowed |new - old| per fingerprint entry: 0 for exact dtypes, else relative to sum |x|."""
    if not (t.is_floating_point() or t.is_complex()):
        return torch.zeros_like(old_fp)
    weight = float(FINGERPRINT_MAX_WEIGHT)
    scale = torch.tensor([1.0, 1.0, weight, 0.0, 0.0, 0.0], dtype=_F64, device=old_fp.device)
    return old_fp[1].abs() * scale * _FLOAT_RTOL


# ---------------------------------------------------------------------------------- fixed buffers


@dataclasses.dataclass
class _Entry:
    kind: Kind
    shape: tuple[int, ...]
    dtype: torch.dtype
    fp: Tensor | None  # None for a meta tensor: nothing to compare


@dataclasses.dataclass
class _Fixed:
    """A fixed buffer of the model as it is now."""

    qname: str
    module: nn.Module
    buffer: str
    kind: Kind
    tensor: Tensor


def _fixed_kinds(mod: nn.Module) -> dict[str, Kind]:
    """The fixed buffers a module owns, by name, with how a change of each is judged."""
    names: dict[str, Kind] = {}
    saved = {b: b not in mod._non_persistent_buffers_set for b in mod._buffers}
    if isinstance(mod, RandomMask):
        names.update((b, "random") for b, persistent in saved.items() if persistent)
    if isinstance(mod, _DERIVED_TYPES):
        names.update((b, "derived") for b, persistent in saved.items() if not persistent)
    for b in getattr(mod, "_statplug_fixed_buffers", ()):
        names.setdefault(b, "marked")
    return names


def _fixed_buffers(model: nn.Module) -> Iterator[_Fixed]:
    """Every fixed buffer of ``model``: masks' and encodings', and any module's marked ones."""
    for prefix, mod in model.named_modules():
        for b, kind in _fixed_kinds(mod).items():
            buf = mod._buffers.get(b)
            if buf is not None:
                yield _Fixed(_join(prefix, b), mod, b, kind, buf)


def _entry(kind: Kind, t: Tensor) -> _Entry:
    fp = None if t.device.type == "meta" else fingerprint(t)
    return _Entry(kind, tuple(t.shape), t.dtype, fp)


class FixedBufferSnapshot:
    """Fingerprints of a model's fixed buffers; made by :func:`snapshot_fixed_buffers`.

    Pass it to :func:`check_fixed_buffers` (or ``audit(..., fixed_snapshot=snapshot)``) later.
    Entries are keyed by qualified buffer name, so check the same model object (not, say, its DDP
    wrapper, whose names start with ``module.``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.entries: dict[str, _Entry] = {}
        self.refresh(model)

    def refresh(self, model: nn.Module) -> FixedBufferSnapshot:
        """Re-record every fixed buffer of ``model`` (after changing one on purpose)."""
        with torch.no_grad():
            self.entries = {f.qname: _entry(f.kind, f.tensor) for f in _fixed_buffers(model)}
        return self

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"FixedBufferSnapshot({len(self.entries)} buffers)"


def snapshot_fixed_buffers(model: nn.Module) -> FixedBufferSnapshot:
    """Record a fingerprint of every fixed buffer of ``model`` (masks, encodings, marked buffers).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from statplug.audit import check_fixed_buffers, snapshot_fixed_buffers
        >>> from statplug.encodings import SinusoidalEncoding
        >>> from statplug.masks import RandomMask
        >>> model = nn.Sequential(SinusoidalEncoding(8, max_len=16), RandomMask(8, 0.5, seed=0))
        >>> snap = snapshot_fixed_buffers(model)
        >>> _ = model[0](torch.zeros(1, 64, 8))   # the table regrows to 64 positions: fine
        >>> check_fixed_buffers(model, snap)
        []
        >>> with torch.no_grad():
        ...     _ = model[1].mask.logical_not_()  # flipped in place: not the draw of its seed
        >>> [(f.code, f.name) for f in check_fixed_buffers(model, snap)]
        [('fixed-buffer-mutated', '1.mask')]
    """
    return FixedBufferSnapshot(model)


def _same(a: Tensor | None, b: Tensor) -> bool:
    return a is not None and (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(a, b)


class _Expected:
    """What masks and encodings must hold (their ``expected_buffers()``), computed once each."""

    def __init__(self) -> None:
        self._by_module: dict[int, dict[str, Tensor]] = {}

    def legit(self, f: _Fixed) -> bool:
        """Is the change of ``f`` one its module makes itself (regrowth, resampling, a load)?"""
        mod = f.module
        if f.kind == "marked" or not isinstance(mod, (RandomMask, *_DERIVED_TYPES)):
            return False
        expected = self._by_module.get(id(mod))
        if expected is None:
            expected = self._by_module[id(mod)] = mod.expected_buffers()
        # A random mask's seed and mask change together: both are right when the mask is.
        names = list(expected) if f.kind == "random" else [f.buffer]
        bufs = mod._buffers
        return bool(expected) and all(
            n in expected and _same(bufs.get(n), expected[n]) for n in names
        )


def _describe_change(old: _Entry, new: Tensor) -> str:
    if tuple(new.shape) != old.shape:
        return f"shape {list(old.shape)} at registration, {list(new.shape)} now"
    if new.dtype != old.dtype:
        return f"dtype {old.dtype} at registration, {new.dtype} now"
    return "its values changed since registration"


_FIX = {
    "random": (
        "the mask no longer equals the draw from its `seed`; change it only with "
        "`resample_(seed)` or load_state_dict, never in place (an optimizer, a `.data` write or "
        "an in-place op)"
    ),
    "derived": (
        "the table no longer equals what the module computes from its arguments; never write "
        "to it (call `reset_parameters()` to rebuild it)"
    ),
    "marked": (
        "it is listed in `_statplug_fixed_buffers`; find what writes to it (optimizer, in-place "
        "op), or, if the change is deliberate, call `snapshot.refresh(model)` afterwards"
    ),
}


def _suspects(current: list[_Fixed], snapshot: FixedBufferSnapshot) -> list[_Fixed]:
    """The fixed buffers that changed since ``snapshot`` (one host read per device); buffers
    first seen here, or that cannot be compared (meta), are recorded instead."""
    maybe: list[_Fixed] = []
    pending: dict[torch.device, list[tuple[_Fixed, Tensor]]] = {}
    for f in current:
        old = snapshot.entries.get(f.qname)
        if old is None or old.fp is None or f.tensor.device.type == "meta":
            snapshot.entries[f.qname] = _entry(f.kind, f.tensor)
        elif tuple(f.tensor.shape) != old.shape or f.tensor.dtype != old.dtype:
            maybe.append(f)
        else:
            new_fp = fingerprint(f.tensor)
            old_fp = old.fp.to(new_fp.device)
            changed = ((new_fp - old_fp).abs() > _tolerance(old_fp, f.tensor)).any()
            pending.setdefault(new_fp.device, []).append((f, changed))
    for items in pending.values():
        flags = torch.stack([c for _, c in items]).tolist()
        maybe += [f for (f, _), flag in zip(items, flags, strict=True) if flag]
    order = {id(f): i for i, f in enumerate(current)}
    return sorted(maybe, key=lambda f: order[id(f)])


def _removed(model: nn.Module, snapshot: FixedBufferSnapshot, seen: set[str]) -> list[Finding]:
    """Findings for fixed buffers gone from modules still in the model. A module removed from
    the model is a structural change, not a mutation: its entries are forgotten."""
    findings = []
    live = {prefix for prefix, _ in model.named_modules()}
    for qname in [q for q in snapshot.entries if q not in seen]:
        if qname.rpartition(".")[0] not in live:
            del snapshot.entries[qname]
            continue
        findings.append(
            Finding.of(
                "fixed-buffer-mutated",
                qname,
                f"fixed buffer `{qname}` was removed or set to None since registration "
                "(expected a tensor); restore it, or call `snapshot.refresh(model)` if the "
                "removal is deliberate",
            )
        )
    return findings


def check_fixed_buffers(model: nn.Module, snapshot: FixedBufferSnapshot) -> list[Finding]:
    """``fixed-buffer-mutated`` findings for the fixed buffers of ``model`` that changed.

    Buffers first seen here are added to ``snapshot``; legitimate changes (a regrown table, a
    resampled or loaded random mask) update it. Costs one host read per device.
    """
    findings: list[Finding] = []
    current = list(_fixed_buffers(model))
    expected = _Expected()
    with torch.no_grad():
        for f in _suspects(current, snapshot):
            old = snapshot.entries[f.qname]
            if expected.legit(f):
                snapshot.entries[f.qname] = _entry(old.kind, f.tensor)
                continue
            findings.append(
                Finding.of(
                    "fixed-buffer-mutated",
                    f.qname,
                    f"{type(f.module).__name__} buffer `{f.qname}` must stay fixed but "
                    f"{_describe_change(old, f.tensor)} (expected the registered value); "
                    f"{_FIX[old.kind]}",
                )
            )
    return findings + _removed(model, snapshot, {f.qname for f in current})


# ---------------------------------------------------------------------------------- rank divergence


def _stats(model_or_stats: nn.Module | Iterable[Stat]) -> list[tuple[str, Stat]]:
    """(name, stat) of every stat, on a device that holds values (meta stats are skipped)."""
    if isinstance(model_or_stats, nn.Module):
        found = [
            (name or stat.stat_name, stat)
            for name, stat in named_statplug_modules(model_or_stats, Stat)
        ]
    else:
        found = [(s.stat_name, s) for s in model_or_stats]
    return [(n, s) for n, s in found if all(b.device.type != "meta" for b in s.buffers())]


@dataclasses.dataclass
class _StatVector:
    """Every stat's layout and state fingerprints in one float64 vector; ``owners[i]`` is the
    (stat index, state name, or None for the layout) of entry ``i``."""

    vector: Tensor
    owners: list[tuple[int, str | None]]


def _stat_vector(stats: list[tuple[str, Stat]], device: torch.device) -> _StatVector:
    parts: list[Tensor] = [torch.zeros(0, dtype=_F64, device=device)]
    owners: list[tuple[int, str | None]] = []
    for i, (_, stat) in enumerate(stats):
        sd = stat.state_dict(keep_vars=True)  # the saved buffers, as a checkpoint holds them
        parts.append(torch.tensor(layout_fingerprint([stat]), dtype=_F64, device=device))
        owners += [(i, None)] * 2
        for s in stat.state_names:
            t = sd.get(s, stat._buffers.get(s))
            if isinstance(t, Tensor):
                fp = fingerprint(t).to(device)
                parts.append(fp)
                owners += [(i, s)] * fp.numel()
    return _StatVector(torch.cat(parts), owners)


def _max_and_min(vec: Tensor, group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """Per entry, the maximum and the minimum over ranks: one MAX all-reduce of ``[v, -v]``."""
    both = torch.cat((vec, -vec))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = vec.numel()
    return both[:n], -both[n:]


def _same_layout(stats: list[tuple[str, Stat]], group: dist.ProcessGroup | None) -> bool:
    """Do all ranks hold the same number and layout of stats? A fixed-size exchange, so a rank
    with no stats meets its peers in the same collective (and none waits for another)."""
    n = float(len(stats))
    vec = torch.tensor([n, *layout_fingerprint(s for _, s in stats)], dtype=_F64,
                       device=group_device(group))
    hi, lo = _max_and_min(vec, group)
    return bool(torch.equal(hi, lo))


def _diverged(fps: _StatVector, group: dist.ProcessGroup | None, rtol: float) -> list[bool]:
    """Per entry: does it differ across ranks?"""
    hi, lo = _max_and_min(fps.vector, group)
    differs = (hi - lo) > rtol * torch.maximum(hi.abs(), lo.abs())
    return [bool(d) for d in differs.tolist()]


def _layout_finding(stats: list[tuple[str, Stat]], group: dist.ProcessGroup | None) -> Finding:
    counts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(counts, len(stats), group=group)  # error path only
    return Finding.of(
        "rank-divergence",
        "<stat layout>",
        f"ranks hold different stats: {counts} stats per rank, or the same number with other "
        "classes, shapes or dtypes (expected one layout on every rank); build the same model on "
        "every rank, and call `statplug.sync_stats(model)` there, which names the first "
        "differing stat",
    )


def _divergence_finding(name: str, stat: Stat, states_bad: list[str | None], world: int) -> Finding:
    if None in states_bad:
        what = "its layout (class, state names, shapes or dtypes) differs across ranks"
    else:
        what = "state " + ", ".join(f"`{s}`" for s in states_bad) + " differs across ranks"
    return Finding.of(
        "rank-divergence",
        name,
        f"{type(stat).__name__} `{name}`: {what} (expected identical values on all {world} "
        "ranks after a sync); call `statplug.sync_stats(model)` on every rank before reading or "
        "saving stats, keep stat buffers out of DDP's broadcast with "
        "`exclude_from_ddp_broadcast`, and do not update stats between the sync and this check",
    )


def check_rank_divergence(
    model: nn.Module | Iterable[Stat], group: dist.ProcessGroup | None = None, *, rtol: float = 0.0
) -> list[Finding]:
    """``rank-divergence`` findings: stats whose state differs across the ranks of ``group``.

    Call it on every rank at the same point, right after :func:`statplug.sync_stats`, when every
    rank should hold the same global statistics. It is a collective of two MAX all-reduces on
    ``group_device(group)`` (NCCL-safe), whatever the number of stats: a fixed-size one of the
    stat count and layout, which every rank joins even with no stats (ranks holding different
    layouts get one ``rank-divergence`` finding naming the counts, never a hang), then one of
    every state's fingerprint. Every rank returns the same findings. A no-op returning ``[]``
    when ``torch.distributed`` is not initialised or the group has one rank; stats on the meta
    device are skipped.

    Args:
        model: a module (every :class:`~statplug.stats.Stat` in it) or an iterable of stats.
        group: process group. Default: None (the default group).
        rtol: relative tolerance on each fingerprint entry. Default: 0.0 (after a sync every rank
            holds bit-identical state).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
        return []
    stats = _stats(model)
    with torch.no_grad():
        if not _same_layout(stats, group):
            return [_layout_finding(stats, group)]
        if not stats:  # no rank holds one: all agree
            return []
        fps = _stat_vector(stats, group_device(group))
        flags = _diverged(fps, group, rtol)
    bad: dict[int, list[str | None]] = {}
    for flag, (i, state) in zip(flags, fps.owners, strict=True):
        if flag and state not in bad.setdefault(i, []):
            bad[i].append(state)
    world = dist.get_world_size(group)
    return [
        _divergence_finding(*stats[i], states_bad, world)
        for i, states_bad in bad.items()
        if states_bad
    ]
