"""Where a process group's collectives take their tensors: :func:`group_device`.

NCCL refuses CPU tensors; gloo accepts any. The backend *string* does not tell which a group
uses: ``init_process_group()`` without a backend reports ``"undefined"`` (torch 2.13) and a
mixed group reports ``"cpu:gloo,cuda:nccl"``. So the device is decided from whether the group
has a backend for CUDA at all, and every collective statplug builds puts its tensors there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from statplug.errors import StatplugError
from statplug.stats.base import Stat

__all__ = ["group_device", "has_cuda_backend", "require_group_device"]


def has_cuda_backend(backend: str) -> bool:
    """Whether a backend string (``dist.get_backend``'s answer) drives CUDA tensors.

    ``"nccl"``, ``"cpu:gloo,cuda:nccl"`` and ``"undefined"`` (the default backends, which
    include NCCL on a machine with CUDA) do; ``"gloo"`` and ``"mpi"`` alone do not.

    Example:
        >>> [has_cuda_backend(b) for b in ("nccl", "cpu:gloo,cuda:nccl", "gloo")]
        [True, True, False]
    """
    text = backend.lower()
    if text == "undefined":
        return torch.cuda.is_available()
    parts = [p.strip() for p in text.split(",")]
    return any(p == "nccl" or p.startswith("cuda:") for p in parts)


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device every collective input for ``group`` must live on.

    CUDA's current device for a group with a CUDA backend (whatever the backend string says),
    the CPU otherwise. ``group`` None is the default (world) group.
    """
    if has_cuda_backend(str(dist.get_backend(group))) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def require_group_device(
    stats: Iterable[Stat], group: dist.ProcessGroup | None, caller: str
) -> None:
    """Raise naming the first stat not on ``group_device(group)``: never hand it to NCCL.

    A no-op without an initialised process group (nothing is communicated then).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    expected = group_device(group)
    for stat in stats:
        device = next(stat.buffers()).device
        if device != expected:
            raise StatplugError(
                f"{caller}: stat `{stat.stat_name}` is on {device}, but the process group's "
                f"collectives run on {expected} (expected every stat there); move the model "
                f"with `.to({str(expected)!r})` before syncing, or sync over a group of that device"
            )
