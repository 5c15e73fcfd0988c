"""Runtime audit checks: ``fixed-buffer-mutated`` and ``rank-divergence``.

Both compare cheap fingerprints computed on the tensors' own device: per tensor a float64 vector
(sum, sum of absolute values, a position-weighted sum, and the counts of NaN, +inf and -inf), so a
check costs a few reductions and one host read, never a copy of the state.

**Fixed buffers.** :func:`snapshot_fixed_buffers` records a fingerprint of every buffer that must
not change during training, and :func:`check_fixed_buffers` reports those that did:

* every persistent buffer of a :class:`~statplug.masks.RandomMask` (``mask``, ``seed``). A changed
  mask is accepted when it equals the draw from its current ``seed`` (``resample_`` or a loaded
  checkpoint), so only a mask that disagrees with its own seed is reported;
* the derived buffers of :class:`~statplug.masks.CausalMask`,
  :class:`~statplug.encodings.SinusoidalEncoding` and :class:`~statplug.encodings.RotaryEncoding`.
  These regrow (a longer table replaces the cache) and are rebuilt by ``reset_parameters()``; a
  changed one is accepted when it equals what the module's own generator builds at its current
  length;
* every buffer named in a module's ``_statplug_fixed_buffers`` (see below). These have no
  generator: any change is reported. After changing one on purpose (e.g. a new pruning round),
  call :meth:`FixedBufferSnapshot.refresh`.

A change found legitimate updates the snapshot, so the next check is cheap again.

The ``_statplug_fixed_buffers`` hook: a module (class or instance attribute) may declare
``_statplug_fixed_buffers: tuple[str, ...]``, the names of its own buffers that are fixed once
registered, e.g. a magnitude-pruning mask::

    linear.register_buffer("weight_mask", mask)
    linear._statplug_fixed_buffers = ("weight_mask",)

**Rank divergence.** :func:`check_rank_divergence` fingerprints every stat's declared state and
compares ranks with one MAX all-reduce of ``[fp, -fp]`` (the maximum and, negated, the minimum
over ranks): a stat whose maximum and minimum differ is not the same on every rank.
"""

from __future__ import annotations

import copy
import dataclasses
import zlib
from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from statplug._buffers import name_modules, qualified_name
from statplug.audit.report import Finding
from statplug.encodings import RotaryEncoding, SinusoidalEncoding
from statplug.masks import CausalMask, RandomMask
from statplug.stats.base import Stat

__all__ = [
    "FixedBufferSnapshot",
    "check_fixed_buffers",
    "check_rank_divergence",
    "snapshot_fixed_buffers",
]

_F64 = torch.float64
_DERIVED_TYPES = (CausalMask, SinusoidalEncoding, RotaryEncoding)
# Fixed buffers of floating dtype may be fingerprinted on another device (or thread count) than at
# the snapshot, which changes the float64 summation order: allow this much relative slack.
_FLOAT_RTOL = 1e-9
_HASH_M = 65521  # a prime: position weights are 1 .. _HASH_M

Kind = Literal["random", "derived", "marked"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def fingerprint(t: Tensor) -> Tensor:
    """Float64 ``[6]`` summary of ``t`` on its device: sums of x, |x|, w*x; #nan, #+inf, #-inf.

    Non-finite values are counted apart, so the sums stay finite and two fingerprints compare
    exactly. The weights ``w`` are integers from a quadratic hash of the position (a linear one
    cannot tell ``[1, 0, 0, 1]`` from ``[0, 1, 1, 0]``), so a permutation is visible, and for
    bool and integer tensors every sum is an exact integer, whatever the summation order.
    """
    x = t.detach().reshape(-1).to(_F64)
    finite = torch.isfinite(x)
    s = torch.where(finite, x, 0.0)
    i = torch.arange(x.numel(), dtype=torch.int64, device=x.device).remainder_(_HASH_M)
    w = (i * i % _HASH_M * 40503 + i * 9973).remainder_(_HASH_M).add_(1).to(_F64)
    return torch.stack(
        (
            s.sum(),
            s.abs().sum(),
            (s * w).sum(),
            torch.isnan(x).sum().to(_F64),
            (x == torch.inf).sum().to(_F64),
            (x == -torch.inf).sum().to(_F64),
        )
    )


def _tolerance(old_fp: Tensor, t: Tensor) -> Tensor:
    """Allowed |new - old| per fingerprint entry: 0 for exact dtypes, else relative to sum |x|."""
    if not (t.is_floating_point() or t.is_complex()):
        return torch.zeros_like(old_fp)
    scale = torch.tensor(
        [1.0, 1.0, float(_HASH_M), 0.0, 0.0, 0.0], dtype=_F64, device=old_fp.device
    )
    return old_fp[1].abs() * scale * _FLOAT_RTOL


# ---------------------------------------------------------------------------------- fixed buffers


@dataclasses.dataclass
class _Entry:
    kind: Kind
    shape: tuple[int, ...]
    dtype: torch.dtype
    fp: Tensor | None  # None for a meta tensor: nothing to compare


def _fixed_buffers(model: nn.Module) -> Iterable[tuple[str, nn.Module, str, Kind, Tensor]]:
    """(qualified name, owning module, buffer name, kind, tensor) of every fixed buffer."""
    for prefix, mod in model.named_modules():
        names: dict[str, Kind] = {}
        if isinstance(mod, RandomMask):
            for b in mod._buffers:
                if b not in mod._non_persistent_buffers_set:
                    names[b] = "random"
        if isinstance(mod, _DERIVED_TYPES):
            for b in mod._buffers:
                if b in mod._non_persistent_buffers_set:
                    names[b] = "derived"
        for b in getattr(mod, "_statplug_fixed_buffers", ()):
            names.setdefault(b, "marked")
        for b, kind in names.items():
            buf = mod._buffers.get(b)
            if buf is not None:
                yield _join(prefix, b), mod, b, kind, buf


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
            self.entries = {q: _entry(kind, t) for q, _, _, kind, t in _fixed_buffers(model)}
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


def _regenerate(mod: nn.Module) -> dict[str, Tensor] | None:
    """What the module's own generator builds for its derived buffers at the current length."""
    if isinstance(mod, CausalMask):
        length = int(mod._cache().shape[0])
    elif isinstance(mod, SinusoidalEncoding | RotaryEncoding):
        length = mod._cached_len()
    else:
        return None
    if length < 1:
        return None
    # A shallow copy with its own buffer dict: ``_build`` re-registers buffers on the copy only,
    # on the original's device, so the original is left untouched.
    ref = copy.copy(mod)
    ref.__dict__["_buffers"] = dict(mod._buffers)
    ref.__dict__["_non_persistent_buffers_set"] = set(mod._non_persistent_buffers_set)
    ref._build(length)
    return {k: v for k, v in ref._buffers.items() if v is not None}


def _random_mask_consistent(mod: RandomMask) -> bool:
    """Does ``mask`` equal the draw from the ``seed`` buffer (after ``resample_`` or a load)?"""
    seed, mask = mod._buffers.get("seed"), mod._buffers.get("mask")
    if seed is None or mask is None or seed.numel() != 1 or mask.shape != torch.Size(mod.shape):
        return False
    expected = mod._draw(int(seed.item()))
    return mask.dtype == torch.bool and torch.equal(mask.cpu(), expected)


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


def check_fixed_buffers(model: nn.Module, snapshot: FixedBufferSnapshot) -> list[Finding]:
    """``fixed-buffer-mutated`` findings for the fixed buffers of ``model`` that changed.

    Buffers first seen here are added to ``snapshot``; legitimate changes (a regrown table, a
    resampled or loaded random mask) update it. Costs one host read per device.
    """
    findings: list[Finding] = []
    suspects: list[tuple[str, nn.Module, str, _Entry, Tensor]] = []
    pending: dict[torch.device, list[tuple[int, Tensor]]] = {}
    current = list(_fixed_buffers(model))
    seen = set()
    with torch.no_grad():
        for qname, mod, b, kind, buf in current:
            seen.add(qname)
            old = snapshot.entries.get(qname)
            if old is None or old.fp is None or buf.device.type == "meta":
                snapshot.entries[qname] = _entry(kind, buf)
                continue
            if tuple(buf.shape) != old.shape or buf.dtype != old.dtype:
                suspects.append((qname, mod, b, old, buf))
                continue
            new_fp = fingerprint(buf)
            old_fp = old.fp.to(new_fp.device)
            changed = ((new_fp - old_fp).abs() > _tolerance(old_fp, buf)).any()
            pending.setdefault(new_fp.device, []).append((len(suspects), changed))
            suspects.append((qname, mod, b, old, buf))
        # One host read per device for all cheap comparisons.
        unchanged: set[int] = set()
        for items in pending.values():
            flags = torch.stack([c for _, c in items]).tolist()
            unchanged.update(i for (i, _), flag in zip(items, flags, strict=True) if not flag)
        regenerated: dict[int, dict[str, Tensor] | None] = {}
        for i, (qname, mod, b, old, buf) in enumerate(suspects):
            if i in unchanged:
                continue
            if old.kind == "random" and isinstance(mod, RandomMask):
                legit = _random_mask_consistent(mod)
            elif old.kind == "derived":
                if id(mod) not in regenerated:
                    regenerated[id(mod)] = _regenerate(mod)
                expected = (regenerated[id(mod)] or {}).get(b)
                legit = (
                    expected is not None
                    and expected.dtype == buf.dtype
                    and torch.equal(expected, buf)
                )
            else:
                legit = False
            if legit:
                snapshot.entries[qname] = _entry(old.kind, buf)
                continue
            findings.append(
                Finding.of(
                    "fixed-buffer-mutated",
                    qname,
                    f"{type(mod).__name__} buffer `{qname}` must stay fixed but "
                    f"{_describe_change(old, buf)} (expected the registered value); "
                    f"{_FIX[old.kind]}",
                )
            )
    # A module removed from the model is a structural change, not a mutation: forget it; a buffer
    # removed from a module that is still there is reported.
    live = {prefix for prefix, _ in model.named_modules()}
    for qname in list(snapshot.entries):
        if qname in seen:
            continue
        prefix = qname.rpartition(".")[0]
        if prefix in live:
            findings.append(
                Finding.of(
                    "fixed-buffer-mutated",
                    qname,
                    f"fixed buffer `{qname}` was removed or set to None since registration "
                    "(expected a tensor); restore it, or call `snapshot.refresh(model)` if the "
                    "removal is deliberate",
                )
            )
        else:
            del snapshot.entries[qname]
    return findings


# ---------------------------------------------------------------------------------- rank divergence


def _stats(model_or_stats: nn.Module | Iterable[Stat]) -> list[tuple[str, Stat]]:
    if isinstance(model_or_stats, nn.Module):
        name_modules(model_or_stats)
        return [
            (name or qualified_name(mod), mod)
            for name, mod in model_or_stats.named_modules()
            if isinstance(mod, Stat)
        ]
    return [(qualified_name(s), s) for s in model_or_stats]


def _layout_code(name: str, stat: Stat, states: dict[str, Tensor]) -> float:
    """A float64-exact code of the stat's layout, stable across processes (no salted hash)."""
    text = f"{name}|{type(stat).__qualname__}|" + "|".join(
        f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in states.items()
    )
    return float(zlib.crc32(text.encode()))


def check_rank_divergence(
    model: nn.Module | Iterable[Stat], group: dist.ProcessGroup | None = None, *, rtol: float = 0.0
) -> list[Finding]:
    """``rank-divergence`` findings: stats whose state differs across the ranks of ``group``.

    Call it on every rank at the same point, right after :func:`statplug.sync_stats`, when every
    rank should hold the same global statistics. It is a collective: exactly one MAX all-reduce of
    a float64 vector on the stats' device (NCCL-safe), whatever the number of stats, and it
    requires the same stat layout on every rank (which ``sync_stats`` checks). Every rank returns
    the same findings. Pending work is folded into the saved buffers first (as ``state_dict()``
    does). A no-op returning ``[]`` when ``torch.distributed`` is not initialised, the group has
    one rank, or the model has no stats; stats on the meta device are skipped.

    Args:
        model: a module (every :class:`~statplug.stats.Stat` in it) or an iterable of stats.
        group: process group. Default: None (the default group).
        rtol: relative tolerance on each fingerprint entry. Default: 0.0 (after a sync every rank
            holds bit-identical state).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    if dist.get_world_size(group) <= 1:
        return []
    stats = [(n, s) for n, s in _stats(model) if all(b.device.type != "meta" for b in s.buffers())]
    if not stats:
        return []
    device = next(stats[0][1].buffers()).device
    parts: list[Tensor] = []
    # owners[i] = (stat index, state name or None for the layout entry) of vector entry i.
    owners: list[tuple[int, str | None]] = []
    with torch.no_grad():
        for i, (name, stat) in enumerate(stats):
            sd = stat.state_dict(keep_vars=True)  # folds pending work into the saved buffers
            states: dict[str, Tensor] = {}
            for s in stat.state_names:
                t = sd.get(s, stat._buffers.get(s))
                if isinstance(t, Tensor):
                    states[s] = t
            parts.append(
                torch.tensor([_layout_code(name, stat, states)], dtype=_F64, device=device)
            )
            owners.append((i, None))
            for s, t in states.items():
                fp = fingerprint(t).to(device)
                parts.append(fp)
                owners.extend([(i, s)] * fp.numel())
        vec = torch.cat(parts)
        both = torch.cat((vec, -vec))
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        n = vec.numel()
        hi, lo = both[:n], -both[n:]
        diverged = ((hi - lo) > rtol * torch.maximum(hi.abs(), lo.abs())).tolist()
    bad: dict[int, list[str | None]] = {}
    for flag, (i, state) in zip(diverged, owners, strict=True):
        if flag and state not in bad.setdefault(i, []):
            bad[i].append(state)
    findings = []
    world = dist.get_world_size(group)
    for i, states_bad in bad.items():
        if not states_bad:
            continue
        name, stat = stats[i]
        if None in states_bad:
            what = "its layout (class, state names, shapes or dtypes) differs across ranks"
        else:
            what = "state " + ", ".join(f"`{s}`" for s in states_bad) + " differs across ranks"
        findings.append(
            Finding.of(
                "rank-divergence",
                name,
                f"{type(stat).__name__} `{name}`: {what} (expected identical values on all "
                f"{world} ranks after a sync); call `statplug.sync_stats(model)` on every rank "
                "before reading or saving stats, keep stat buffers out of DDP's broadcast with "
                "`exclude_from_ddp_broadcast`, and do not update stats between the sync and this "
                "check",
            )
        )
    return findings
