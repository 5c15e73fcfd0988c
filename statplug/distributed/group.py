"""Where a process group's collectives take their tensors: :func:`group_device`.

NCCL refuses CPU tensors; gloo accepts any. The backend *string* does not tell which a group
uses: ``init_process_group()`` without a backend reports ``"undefined"`` (torch 2.13) and a
mixed group reports ``"cpu:gloo,cuda:nccl"``. So the device is decided from whether the group
has a backend for CUDA at all, and every collective statplug builds puts its tensors there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["group_device", "has_cuda_backend"]


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
