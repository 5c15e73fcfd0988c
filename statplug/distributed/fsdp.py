"""Keep torch FSDP's buffer mixed precision away from stats: :func:`exclude_from_fsdp_buffer_cast`.

torch FSDP (``FullyShardedDataParallel``) with ``MixedPrecision(buffer_dtype=...)`` casts every
buffer it manages to ``buffer_dtype`` at its lazy initialisation (the first forward,
``state_dict``, ``load_state_dict`` or ``summon_full_params``) by assigning ``buffer.data``, which
statplug's dtype pinning (``nn.Module._apply``) never sees. Buffers FSDP lists in an instance's
``_ignored_buffer_names`` are neither cast there nor up-cast again in ``state_dict``; this module
adds the buffers of every statplug module to those lists. FSDP2 (``fully_shard``) has no buffer
dtype and needs nothing. See ``docs/design-notes.md`` ("FSDP mixed precision").
"""

from __future__ import annotations

import torch
from torch import nn

from statplug._buffers import PinnedDtypeModule, named_statplug_modules
from statplug._compat import fsdp_clean_name, fsdp_ignored_buffer_names
from statplug.errors import StatplugError

__all__ = ["exclude_from_fsdp_buffer_cast"]

_IGNORED = "_ignored_buffer_names"  # named in the error message (see statplug._compat)


def _clean(name: str) -> str:
    """FSDP's clean buffer name: the wrapper prefixes (``_fsdp_wrapped_module.``, activation
    checkpointing's) removed, as FSDP does before looking a name up in its ignored set."""
    return fsdp_clean_name(name)


def exclude_from_fsdp_buffer_cast(module: nn.Module) -> list[str]:
    """Keep FSDP's buffer mixed precision from casting stats, masks and encodings.

    Call it on the model right after wrapping it in torch FSDP
    (``torch.distributed.fsdp.FullyShardedDataParallel``, auto-wrapped or nested instances
    included) and before its first forward, ``state_dict``, ``load_state_dict`` or
    ``summon_full_params``: FSDP casts buffers at the first of those. Afterwards every statplug
    buffer keeps its dtype under ``MixedPrecision(buffer_dtype=...)`` and is saved in it; other
    buffers are cast as before. A module without torch FSDP inside (an unwrapped model, or one
    sharded with FSDP2's ``fully_shard``, which never casts buffers) is left alone. Lightning: the
    ``SyncStats`` callback calls it in ``on_fit_start``. Returns the qualified buffer names
    excluded (as the outermost FSDP instance names them).

    Raises:
        StatplugError: FSDP already cast some statplug buffer (the call came too late: their
            values may be rounded, and are not silently restored), or this torch's FSDP lacks
            the ignored-buffer list statplug relies on.

    Example:
        >>> from torch import nn
        >>> from statplug import RunningNorm, exclude_from_fsdp_buffer_cast
        >>> exclude_from_fsdp_buffer_cast(nn.Sequential(RunningNorm(3)))  # no FSDP: nothing to do
        []
    """
    if not torch.distributed.is_available():  # a torch build without distributed: no FSDP
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel

    instances = FullyShardedDataParallel.fsdp_modules(module)
    if not instances:
        return []
    pinned: list[PinnedDtypeModule] = []
    for qname, mod in named_statplug_modules(module, PinnedDtypeModule):
        if qname:
            mod.stat_name = _clean(qname)  # the model's names, not the wrappers'
        pinned.append(mod)
    owned: set[int] = {id(b) for m in pinned for b in m.buffers(recurse=False)}
    if not owned:
        return []
    names: list[str] = []
    for fsdp in instances:
        ignored = fsdp_ignored_buffer_names(fsdp)
        if ignored is None:
            raise StatplugError(
                "exclude_from_fsdp_buffer_cast: this torch's FullyShardedDataParallel has no "
                f"`{_IGNORED}` set (expected in torch 2.4-2.13), so statplug cannot keep its "
                "buffers out of FSDP's buffer cast. Pass the stat modules as FSDP's "
                "`ignored_states` instead, or use a MixedPrecision whose `buffer_dtype` is None"
            )
        mine = [_clean(n) for n, b in fsdp.named_buffers() if id(b) in owned]
        ignored.update(mine)
        if fsdp is instances[0]:
            names = mine
    _raise_if_already_cast(pinned)
    return names


def _raise_if_already_cast(modules: list[PinnedDtypeModule]) -> None:
    """FSDP casts at its lazy init; a call after it finds demoted buffers, which must not be
    promoted back: their values were rounded (a stat loaded from a checkpoint, say)."""
    late = [(m, m.demoted_buffers()) for m in modules]
    late = [(m, bad) for m, bad in late if bad]
    if not late:
        return
    mod, bad = late[0]
    name, want, got = bad[0]
    raise StatplugError(
        f"exclude_from_fsdp_buffer_cast: FSDP already cast the buffers of {len(late)} statplug "
        f"module(s), e.g. `{mod.stat_name}.{name}` is {got} (pinned {want}); their values may be "
        "rounded and are not restored. Call it right after wrapping the model in FSDP, before "
        "the first forward, state_dict, load_state_dict or summon_full_params"
    )
