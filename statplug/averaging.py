"""Weight averaging with statplug state: the averaged copy uses the live stats and masks.

Stats, random masks, encodings and pruning masks describe the data and the model's structure,
not its weights. An averaged count is not a count, an averaged bool mask is not a mask (torch's
SWA average even fails on bool buffers), and a weight average of normaliser means is the mean of
no data. A weight-averaged model therefore runs with the *live* model's statplug state, copied
exactly, while its parameters are averaged.

:func:`state_buffers` names that state in a model: every buffer (saved or hidden working state)
of a statplug module (a stat, mask or encoding), and every buffer a module lists in
``_statplug_fixed_buffers`` (magnitude-pruning masks). :func:`copy_stats_` copies it into a
module of the same structure, such as a :class:`torch.optim.swa_utils.AveragedModel`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from statplug._buffers import PinnedDtypeModule
from statplug.errors import StatplugError

__all__ = ["StateBuffer", "copy_stats_", "state_buffers"]

# A module's own buffers that are structure, fixed between deliberate changes (the audit's
# fixed-buffer hook; MagnitudePruning lists its masks there).
FIXED_ATTR = "_statplug_fixed_buffers"


@dataclass(frozen=True, eq=False)
class StateBuffer:
    """One buffer of statplug state: ``module.<name>``, where ``module`` is named ``module_name``
    inside the model (``""`` for the model itself)."""

    module_name: str
    module: nn.Module
    name: str

    @property
    def qualified_name(self) -> str:
        return f"{self.module_name}.{self.name}" if self.module_name else self.name


def state_buffers(model: nn.Module) -> list[StateBuffer]:
    """Every buffer of statplug state in ``model``, in ``named_modules()`` order.

    That is every buffer of a stat, mask or encoding (the saved ones and the hidden working
    ones) and every buffer a module names in ``_statplug_fixed_buffers`` (pruning masks). An
    :class:`~torch.optim.swa_utils.AveragedModel` is read through its ``module``.
    """
    return [
        StateBuffer(mod_name, mod, name)
        for mod_name, mod, names in _state_owners(_unwrap(model))
        for name in names
    ]


def _state_owners(root: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """``(qualified name, module, buffer names)`` of every module holding statplug state."""
    for mod_name, mod in root.named_modules():
        names = list(mod._buffers) if isinstance(mod, PinnedDtypeModule) else []
        # Through __dict__ first: a missing attribute costs nn.Module.__getattr__ a raise.
        fixed = mod.__dict__.get(FIXED_ATTR) or getattr(type(mod), FIXED_ATTR, ())
        names += [n for n in fixed if n in mod._buffers and n not in names]
        if names:
            yield mod_name, mod, names


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, AveragedModel) else model


@torch.no_grad()
def copy_stats_(dst: nn.Module, src: nn.Module) -> list[str]:
    """Copy every stat, mask and encoding buffer of ``src`` into ``dst``, exactly; returns their
    qualified names.

    ``dst`` is a module of the same structure as ``src`` (a ``copy.deepcopy`` of it, or a
    :class:`torch.optim.swa_utils.AveragedModel` of it, read through its ``module``); only its
    statplug state changes, never its parameters or other buffers (BatchNorm statistics). A
    buffer that ``src`` holds but ``dst`` lacks (a pruning mask registered after ``dst`` was
    made) or holds with another shape (a positional table that grew) is added to ``dst`` as a
    copy on ``dst``'s device; every other buffer is copied in place.

    With ``AveragedModel``: keep its default ``use_buffers=False`` (``use_buffers=True`` averages
    the statplug buffers and fails on the bool ones), and call ``copy_stats_(averaged, model)``
    before evaluating or saving ``averaged``: its stats are then the live model's, whatever ran
    since the last ``update_parameters`` (more training steps, or ``update_bn``, whose train-mode
    passes also feed the averaged copy's normalisers). ``update_parameters`` copies buffers by
    position, so when buffers can appear or grow during training (pruning masks, positional
    tables), also call it just before each ``update_parameters``.

    Args:
        dst: the module that receives the state (an ``AveragedModel`` of ``src``).
        src: the live model.

    Raises:
        StatplugError: ``dst`` has no submodule where ``src`` holds statplug state.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
        >>> from statplug import RunningNorm, copy_stats_
        >>> model = nn.Sequential(RunningNorm(3), nn.Linear(3, 1), nn.BatchNorm1d(1))
        >>> averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        >>> data = [torch.randn(8, 3) * 2 + 5 for _ in range(4)]
        >>> for x in data:  # a training step: forward (stats update), backward, optimizer step
        ...     _ = model(x)
        ...     averaged.update_parameters(model)
        >>> update_bn(data, averaged)  # BatchNorm statistics for the averaged weights...
        >>> int(averaged.module[0].count)  # ...but its RunningNorm saw the data a second time
        64
        >>> names = copy_stats_(averaged, model)
        >>> int(averaged.module[0].count), torch.equal(averaged.module[0].mean, model[0].mean)
        (32, True)
        >>> names[:2]
        ['0.moments.count', '0.moments._agreed_count']
    """
    dst_root, src_root = _unwrap(dst), _unwrap(src)
    copied: list[str] = []
    dsts: list[Tensor] = []
    srcs: list[Tensor] = []
    for mod_name, src_mod, names in _state_owners(src_root):
        dst_mod = _counterpart(dst_root, mod_name, names[0])
        prefix = f"{mod_name}." if mod_name else ""
        for name in names:
            s, d = src_mod._buffers[name], dst_mod._buffers.get(name)
            if s is not None and d is not None and d.shape == s.shape and d.dtype == s.dtype:
                dsts.append(d)  # in place: views and tensors others hold stay valid
                srcs.append(s)
            else:
                _replace_buffer(dst_root, dst_mod, src_mod, name)
            copied.append(prefix + name)
    if dsts:
        torch._foreach_copy_(dsts, srcs)  # one call for all of them
    return copied


def _counterpart(dst_root: nn.Module, mod_name: str, first_buffer: str) -> nn.Module:
    """``dst_root``'s submodule ``mod_name``, or a StatplugError naming what ``src`` holds there."""
    try:
        return dst_root.get_submodule(mod_name)
    except AttributeError:
        raise StatplugError(
            f"copy_stats_: `dst` has no module {mod_name!r}, where `src` holds statplug "
            f"state ({first_buffer!r}); expected a module of the same structure as `src` (an "
            "AveragedModel of it, or a copy.deepcopy)"
        ) from None


def _replace_buffer(dst_root: nn.Module, dst_mod: nn.Module, src_mod: nn.Module, name: str) -> None:
    """Give ``dst_mod`` a copy of ``src_mod``'s buffer ``name`` where it lacks one of that
    shape: registered after ``dst`` was made (a pruning mask), or regrown (a positional table)."""
    src = src_mod._buffers[name]
    dst = dst_mod._buffers.get(name)
    if src is None:
        if dst is not None:
            dst_mod._buffers[name] = None
        return
    device = dst.device if dst is not None else _device_of(dst_mod, dst_root, src)
    persistent = name not in src_mod._non_persistent_buffers_set
    dst_mod.register_buffer(name, src.detach().to(device, copy=True), persistent=persistent)
    marked = tuple(getattr(dst_mod, FIXED_ATTR, ()))
    if name in getattr(src_mod, FIXED_ATTR, ()) and name not in marked:
        setattr(dst_mod, FIXED_ATTR, (*marked, name))


def _device_of(mod: nn.Module, root: nn.Module, fallback: Tensor) -> torch.device:
    """The device ``mod`` lives on (an ``AveragedModel(device=...)`` may differ from ``src``)."""
    for t in (*mod.parameters(), *mod.buffers(), *root.parameters()):
        return t.device
    return fallback.device
