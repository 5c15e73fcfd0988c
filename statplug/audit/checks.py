"""Static audit checks of a model and its optimizers, and :func:`audit`, which runs them all."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from statplug._buffers import PinnedDtypeModule, named_statplug_modules
from statplug.audit.report import AuditReport, Finding
from statplug.audit.runtime import FixedBufferSnapshot, check_fixed_buffers, check_rank_divergence
from statplug.stats import RunningNorm
from statplug.stats.base import Stat

__all__ = ["audit"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Attributes every nn.Module keeps in its __dict__ (parameter and buffer dicts, hooks).
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
# Tensors held outside buffers on purpose by libraries that move them themselves: Lightning's
# example input (moved when it is used).
_KNOWN_UNMANAGED = frozenset({"_example_input_array"})
# Libraries whose modules keep their state as plain attributes and move and save it themselves.
_SELF_MANAGING_PACKAGES = frozenset({"torchmetrics"})
_EXAMPLES = 3


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:_EXAMPLES])
    return shown + (", ..." if len(names) > _EXAMPLES else "")


def _storage_key(t: Tensor) -> tuple[str, int] | None:
    """(device, storage address), or None when there is no memory to share (meta, empty)."""
    if t.device.type == "meta":
        return None
    ptr = t.untyped_storage().data_ptr()
    return None if ptr == 0 else (str(t.device), ptr)


def _alias_key(t: Tensor) -> tuple[Any, ...]:
    """Equal for the same tensor and for views of exactly the same memory (``p`` and ``p.data``)."""
    if t.device.type == "meta" or t.numel() == 0 or t.data_ptr() == 0:
        return ("id", id(t))
    return (str(t.device), t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _as_optimizers(optimizers: Any) -> list[Any]:
    if optimizers is None:
        return []
    if hasattr(optimizers, "param_groups"):
        return [optimizers]
    if isinstance(optimizers, Iterable):
        out = list(optimizers)
        for i, opt in enumerate(out):
            if not hasattr(opt, "param_groups"):
                raise ValueError(
                    f"audit: `optimizers[{i}]` must be a torch.optim.Optimizer (got "
                    f"{type(opt).__name__})"
                )
        return out
    raise ValueError(
        f"audit: `optimizers` must be an optimizer, a list of optimizers or None (got "
        f"{type(optimizers).__name__})"
    )


@dataclass(frozen=True)
class _NamedStat:
    """A stat of the audited model: its qualified name, and the name a user knows it by (a
    normaliser's inner moments go by the normaliser's name: ``encoder.norm``, not
    ``encoder.norm.moments``)."""

    qualified: str
    user: str
    stat: Stat


def _named_stats(model: nn.Module) -> list[_NamedStat]:
    users: dict[str, str] = {}
    found = []
    for prefix, mod in named_statplug_modules(model, PinnedDtypeModule):
        if isinstance(mod, RunningNorm):
            users[_join(prefix, "moments")] = prefix or "RunningNorm"
        elif isinstance(mod, Stat):
            found.append(_NamedStat(prefix, users.get(prefix, prefix or type(mod).__name__), mod))
    return found


def _check_stats(stats: list[_NamedStat]) -> list[Finding]:
    """``stat-is-parameter`` and ``low-precision-stat``."""
    findings: list[Finding] = []
    for s in stats:
        mod, name, kind = s.stat, s.user, type(s.stat).__name__
        for pname, p in mod._parameters.items():
            if p is not None:
                findings.append(
                    Finding.of(
                        "stat-is-parameter",
                        name,
                        f"{kind} state `{_join(s.qualified, pname)}` is registered as an "
                        "nn.Parameter (expected a buffer): an optimizer or weight decay would "
                        "change it and DDP would average it as a gradient. Register stat state "
                        "with `Stat.add_state` (a buffer), never as nn.Parameter",
                    )
                )
        # One finding per stat, naming the stat (its internal buffers are not the user's).
        grad = [n for n, b in mod._buffers.items() if b is not None and b.requires_grad]
        if grad:
            findings.append(
                Finding.of(
                    "stat-is-parameter",
                    name,
                    f"{kind} `{name}` holds state with requires_grad=True (buffers "
                    f"{_examples(grad)}; expected none): autograd would track its updates and "
                    "an optimizer may pick it up. Store plain tensors (`.detach()`), or call "
                    f"`{name}.requires_grad_(False)`",
                )
            )
        findings += _check_precision(s)
    return findings


def _check_precision(s: _NamedStat) -> list[Finding]:
    """``low-precision-stat``: state in float16/bfloat16 (the dtype pinning was bypassed)."""
    mod, name = s.stat, s.user
    low = [(n, b.dtype) for n in mod.state_names if (b := mod._buffers.get(n)) is not None
           and b.dtype in _LOW_PRECISION]
    if not low:
        return []
    return [
        Finding.of(
            "low-precision-stat",
            name,
            f"{type(mod).__name__} `{name}` holds {_examples([n for n, _ in low])} in "
            f"{low[0][1]} (expected {mod.accumulator_dtype}): a half-precision "
            "accumulator loses digits and stops growing. Something bypassed the dtype "
            "pinning (e.g. an assignment to `buffer.data`); rebuild the stat, or "
            f"restore it with `.to({mod.accumulator_dtype})`",
        )
    ]


class _Buffers:
    """The model's buffers, to tell which one an optimizer's tensor is (or shares memory with)
    and which stat owns it."""

    def __init__(self, model: nn.Module, stats: list[_NamedStat]) -> None:
        buffers = list(model.named_buffers())
        self.by_id = {id(b): n for n, b in buffers}
        self.by_storage: dict[tuple[str, int], list[str]] = {}
        for n, b in buffers:
            key = _storage_key(b)
            if key is not None:
                self.by_storage.setdefault(key, []).append(n)
        self.owners = {_join(s.qualified, b): s.user for s in stats for b in s.stat._buffers}

    def find(self, t: Tensor) -> tuple[str | None, str]:
        """(the buffer ``t`` is, or shares storage with, or None; how it relates to it)."""
        name = self.by_id.get(id(t))
        if name is not None:
            return name, "the buffer itself"
        key = _storage_key(t)
        names = self.by_storage.get(key, []) if key is not None else []
        return (names[0], "a tensor sharing its storage") if names else (None, "")


@dataclass
class _Held:
    """One tensor held by the optimizers, with every place that holds it."""

    tensor: Tensor
    wheres: list[str]


def _held_tensors(optimizers: list[Any]) -> list[_Held]:
    """Every tensor the optimizers hold (views of one memory counted as one), in order."""
    held: dict[tuple[Any, ...], _Held] = {}
    for i, opt in enumerate(optimizers):
        for j, group in enumerate(opt.param_groups):
            for t in group.get("params", ()):
                if isinstance(t, Tensor):
                    where = f"optimizer {i} ({type(opt).__name__}) param group {j}"
                    held.setdefault(_alias_key(t), _Held(t, [])).wheres.append(where)
    return list(held.values())


def _check_optimizers(
    model: nn.Module, optimizers: list[Any], stats: list[_NamedStat]
) -> list[Finding]:
    """``buffer-in-optimizer``, ``duplicate-in-optimizer``, ``param-not-in-optimizer`` and
    ``frozen-param-in-optimizer``."""
    findings: list[Finding] = []
    params = dict(model.named_parameters())
    param_names = {id(p): n for n, p in params.items()}
    buffers = _Buffers(model, stats)
    reported: set[str] = set()
    held = _held_tensors(optimizers)
    for h in held:
        bname, how = buffers.find(h.tensor)
        if bname is not None:
            owner = buffers.owners.get(bname)
            if (owner or bname) not in reported:
                reported.add(owner or bname)
                findings.append(_buffer_in_optimizer(bname, owner, h.wheres[0], how))
        pname = param_names.get(id(h.tensor))
        if len(h.wheres) > 1:
            name = pname or bname or f"<tensor in {h.wheres[0]}>"
            findings.append(_duplicate_in_optimizer(name, h.wheres))
        if pname is not None and not h.tensor.requires_grad and bname is None:
            findings.append(_frozen_param_in_optimizer(pname, h.wheres[0]))
    if optimizers:
        groups = [g for opt in optimizers for g in opt.param_groups]
        in_optimizer = {id(t) for g in groups for t in g.get("params", ())}
        stat_params = {id(p) for s in stats for p in s.stat._parameters.values()}
        findings += [
            _param_not_in_optimizer(n, p)
            for n, p in params.items()
            if p.requires_grad and id(p) not in in_optimizer and id(p) not in stat_params
        ]
    return findings


def _buffer_in_optimizer(bname: str, owner: str | None, where: str, how: str) -> Finding:
    fix = (
        "Build the optimizer from `model.parameters()`, not `model.buffers()` or "
        "`state_dict().values()`"
    )
    if owner is not None:
        return Finding.of(
            "buffer-in-optimizer",
            owner,
            f"the state of stat `{owner}` (buffer `{bname}`) is in {where} ({how}); expected only "
            f"parameters in optimizers: a step or weight decay would overwrite it. {fix}",
        )
    return Finding.of(
        "buffer-in-optimizer",
        bname,
        f"buffer `{bname}` is in {where} ({how}); expected only parameters in optimizers: a step "
        f"or weight decay would overwrite non-trained state. {fix}",
    )


def _duplicate_in_optimizer(name: str, wheres: list[str]) -> Finding:
    return Finding.of(
        "duplicate-in-optimizer",
        name,
        f"`{name}` appears {len(wheres)} times (expected once): in " + "; ".join(wheres)
        + ". It would be stepped more than once per iteration. Give each parameter to exactly "
        "one param group of one optimizer",
    )


def _frozen_param_in_optimizer(pname: str, where: str) -> Finding:
    return Finding.of(
        "frozen-param-in-optimizer",
        pname,
        f"parameter `{pname}` has requires_grad=False but is in {where}: it gets no gradient, "
        "so the optimizer only spends memory on it (and some optimizers still apply weight "
        "decay). Leave frozen parameters out, e.g. "
        "`[p for p in model.parameters() if p.requires_grad]`",
    )


def _param_not_in_optimizer(name: str, p: Tensor) -> Finding:
    return Finding.of(
        "param-not-in-optimizer",
        name,
        f"trainable parameter `{name}` (shape {list(p.shape)}) is in no optimizer (expected "
        "every requires_grad parameter to be updated): it gets gradients but never changes. Add "
        "it to an optimizer, or freeze it with `.requires_grad_(False)`",
    )


def _tensors_in(value: Any) -> list[Tensor]:
    """Tensors held directly by ``value`` (itself, or the items of a list, tuple or dict)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, Tensor)]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, Tensor)]
    return []


def _self_managing(mod: nn.Module) -> bool:
    return any(c.__module__.partition(".")[0] in _SELF_MANAGING_PACKAGES for c in type(mod).__mro__)


def _check_unregistered(model: nn.Module) -> list[Finding]:
    """``unregistered-tensor``: tensors in module attributes that are neither parameter nor buffer.

    A reference to one of the model's own parameters is fine (``.to()`` moves a parameter in
    place, so e.g. ``nn.LSTM._flat_weights`` stays valid); a reference to a buffer is not, as
    ``.to()`` replaces buffers and leaves the reference behind.
    """
    findings: list[Finding] = []
    param_ids = {id(p) for p in model.parameters()}
    buffer_ids = {id(b) for b in model.buffers()}
    for prefix, mod in model.named_modules():
        if _self_managing(mod):
            continue
        allowed = set(getattr(mod, "_statplug_unregistered_ok", ()))
        for attr, value in vars(mod).items():
            if attr in _MODULE_INTERNALS or attr in _KNOWN_UNMANAGED or attr in allowed:
                continue
            tensors = _tensors_in(value)
            if not tensors or all(id(t) in param_ids for t in tensors):
                continue
            qname = _join(prefix, attr)
            holder = (
                "a tensor" if isinstance(value, Tensor) else f"a {type(value).__name__} of tensors"
            )
            if any(id(t) in buffer_ids for t in tensors):
                why = (
                    "it refers to a buffer, and `.to()` replaces buffers, leaving this reference "
                    "on the old device"
                )
            elif any(isinstance(t, nn.Parameter) for t in tensors):
                why = (
                    "its parameters are not registered, so they are not trained, saved or moved; "
                    "use nn.ParameterList / nn.ParameterDict"
                )
            else:
                why = "it is not saved in `state_dict` and not moved by `.to()`"
            findings.append(
                Finding.of(
                    "unregistered-tensor",
                    qname,
                    f"{type(mod).__name__} attribute `{qname}` holds {holder} that is neither a "
                    f"parameter nor a buffer: {why}. Register it with "
                    f"`register_buffer({attr!r}, ...)` (persistent=False if it can be "
                    "recomputed) or as nn.Parameter; list deliberate exceptions in the class "
                    "attribute `_statplug_unregistered_ok`",
                )
            )
    return findings


def _check_devices(model: nn.Module) -> list[Finding]:
    """``device-mismatch``: one finding per device other than the one most tensors are on."""
    by_device: dict[torch.device, list[str]] = {}
    for n, p in model.named_parameters():
        by_device.setdefault(p.device, []).append(n)
    for n, b in model.named_buffers():
        by_device.setdefault(b.device, []).append(n)
    if len(by_device) <= 1:
        return []
    main = max(by_device, key=lambda d: len(by_device[d]))  # ties: the first seen
    main_names = by_device[main]
    findings = []
    for device, names in by_device.items():
        if device == main:
            continue
        findings.append(
            Finding.of(
                "device-mismatch",
                names[0],
                f"{len(names)} parameter/buffer tensor(s) on {device} ({_examples(names)}) but "
                f"{len(main_names)} on {main} ({_examples(main_names)}); expected one device "
                f"for the whole model. Move it with `model.to({str(main)!r})` after every "
                "submodule and buffer exists (a buffer registered or replaced after `.to()` "
                "stays where it was created)",
            )
        )
    return findings


def audit(
    model: nn.Module,
    optimizers: Any = None,
    *,
    fixed_snapshot: FixedBufferSnapshot | None = None,
    check_ranks: bool = False,
    group: dist.ProcessGroup | None = None,
) -> AuditReport:
    """Check that a model's non-trained state is held safely; return every problem found.

    Static checks (always): ``buffer-in-optimizer``, ``stat-is-parameter``,
    ``duplicate-in-optimizer``, ``frozen-param-in-optimizer``, ``unregistered-tensor``,
    ``device-mismatch``, ``low-precision-stat``, and ``param-not-in-optimizer`` when optimizers
    are given. Runtime checks (on request): ``fixed-buffer-mutated`` against ``fixed_snapshot``,
    and ``rank-divergence`` with ``check_ranks=True``. A clean model gives no findings at all.

    Args:
        model: the model (any ``nn.Module``; a LightningModule works).
        optimizers: one optimizer or a list of them (anything with ``param_groups``). ``None``
            or an empty list skips ``param-not-in-optimizer``. Default: None.
        fixed_snapshot: from :func:`statplug.audit.snapshot_fixed_buffers` on the same model;
            runs :func:`statplug.audit.check_fixed_buffers`. Default: None.
        check_ranks: run :func:`statplug.audit.check_rank_divergence` on ``group``. It is a
            collective: every rank must call ``audit`` with it at the same point, right after a
            sync. Default: False.
        group: process group for ``check_ranks``. Default: None (the default group).

    Returns:
        An :class:`~statplug.audit.AuditReport`; ``report.raise_for_errors()`` raises
        :class:`~statplug.errors.AuditError` listing every error.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from statplug import RunningMoments, audit
        >>> model = nn.Sequential(RunningMoments(4), nn.Linear(4, 2))
        >>> audit(model, torch.optim.SGD(model.parameters(), lr=0.1)).findings
        []
        >>> bad = torch.optim.SGD([*model.parameters(), model[0].mean], lr=0.1)
        >>> report = audit(model, bad)
        >>> report.ok, [(f.code, f.name) for f in report.findings]   # names the stat, once
        (False, [('buffer-in-optimizer', '0')])
    """
    opts = _as_optimizers(optimizers)
    stats = _named_stats(model)
    findings = [
        *_check_stats(stats),
        *_check_optimizers(model, opts, stats),
        *_check_unregistered(model),
        *_check_devices(model),
    ]
    if fixed_snapshot is not None:
        findings += check_fixed_buffers(model, fixed_snapshot)
    if check_ranks:
        findings += check_rank_divergence(model, group)
    return AuditReport(findings)
