"""Keep DDP's buffer broadcast away from stats: :func:`exclude_from_ddp_broadcast`."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from statplug._buffers import named_statplug_modules
from statplug._compat import ddp_ignore_buffers
from statplug.errors import StatplugError
from statplug.stats.base import Stat

__all__ = ["exclude_from_ddp_broadcast", "stat_buffer_names"]


def stat_buffer_names(module: nn.Module) -> list[str]:
    """Qualified names of every buffer (saved or working) owned by a :class:`Stat` in ``module``."""
    return [
        f"{mod_name}.{b}" if mod_name else b
        for mod_name, stat in named_statplug_modules(module, Stat)
        for b, buf in stat._buffers.items()
        if buf is not None
    ]


def exclude_from_ddp_broadcast(module: nn.Module) -> list[str]:
    """Opt every stat buffer out of DDP's buffer broadcast; call before wrapping ``module``.

    ``DistributedDataParallel(broadcast_buffers=True)`` (the default, and Lightning's) copies rank
    0's buffers over every other rank before each forward with grad enabled, silently replacing
    each rank's local statistics with rank 0's. This registers the stat buffers in DDP's supported
    ignore list (``_set_params_and_buffers_to_ignore_for_model``); other buffers are still
    broadcast. Returns the names excluded.

    Example:
        >>> from torch import nn
        >>> from statplug import RunningMoments, exclude_from_ddp_broadcast
        >>> model = nn.Sequential(nn.Linear(3, 3), RunningMoments(3))
        >>> names = exclude_from_ddp_broadcast(model)
        >>> names[:3], len(names) == len(list(model[1].buffers()))
        (['1.count', '1._agreed_count', '1.n_skipped'], True)
    """
    if isinstance(module, DistributedDataParallel):
        raise StatplugError(
            "exclude_from_ddp_broadcast: the module is already wrapped in DistributedDataParallel, "
            "which reads its ignore list only when it is built; call it on the plain module "
            "before wrapping (Lightning: the SyncStats callback does this in setup)"
        )
    names = stat_buffer_names(module)
    ddp_ignore_buffers(module, names)
    return names
