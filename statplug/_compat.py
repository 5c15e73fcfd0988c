"""Every private name of torch, Lightning and torchmetrics that statplug touches, in one room.

Each helper names the private attribute it reads and the versions it was checked against
(torch 2.4-2.13, lightning 2.4-2.6.6, torchmetrics 1.4-1.9). When one of them changes, this is
the only file to read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "copy_all_",
    "ddp_ignore_buffers",
    "fsdp_clean_name",
    "fsdp_ignored_buffer_names",
    "is_functorch_wrapped",
    "lightning_batches_that_stepped",
    "lightning_epoch_results",
    "lightning_last_eval_batch",
    "metric_reduction",
]


def copy_all_(dsts: list[Tensor], srcs: list[Tensor]) -> None:
    """``dst.copy_(src)`` for every pair, in one call: ``torch._foreach_copy_`` (torch 2.4-2.13;
    a loop of copies when it is missing)."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is None:
        for d, s in zip(dsts, srcs, strict=True):
            d.copy_(s)
    else:
        foreach(dsts, srcs)


def ddp_ignore_buffers(module: nn.Module, names: list[str]) -> None:
    """Add ``names`` to DDP's ignore list of ``module`` (before it is wrapped).

    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` and the attribute it
    writes, ``_ddp_params_and_buffers_to_ignore``: checked against torch 2.4-2.13.
    """
    from torch.nn.parallel import DistributedDataParallel

    existing = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    merged = existing + [n for n in names if n not in set(existing)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, merged)


def fsdp_clean_name(name: str) -> str:
    """FSDP's clean buffer name (wrapper prefixes removed), as FSDP looks it up in its ignored
    set: ``torch.distributed.fsdp._common_utils.clean_tensor_name``, torch 2.4-2.13."""
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    return str(clean_tensor_name(name))


def fsdp_ignored_buffer_names(fsdp: nn.Module) -> set[str] | None:
    """The set of buffer names FSDP's mixed precision leaves alone
    (``_FSDPState._ignored_buffer_names``, torch 2.4-2.13), or None when this torch has none."""
    ignored = getattr(fsdp, "_ignored_buffer_names", None)
    return ignored if isinstance(ignored, set) else None


# Whether a tensor is a functorch (vmap/grad) wrapper: ``torch._C._functorch``, 2.4-2.13.
is_functorch_wrapped: Callable[[Tensor], bool] = torch._C._functorch.is_functorch_wrapped_tensor


def lightning_batches_that_stepped(trainer: Any) -> int:
    """The step Lightning's logger connector logs its own rows at
    (``trainer.fit_loop.epoch_loop._batches_that_stepped``; one less for epoch-level rows, which
    ``_FitLoop.on_advance_end`` logs after decrementing it): lightning 2.4-2.6.6. Falls back to
    ``trainer.global_step``."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    return int(stepped) if isinstance(stepped, int) else int(trainer.global_step)


def lightning_epoch_results(trainer: Any) -> dict[str, Any]:
    """The values logged as torchmetrics ``Metric`` objects that Lightning's logger connector
    will compute at this epoch end, by result key.

    Reads the running loop's ``trainer._results`` (a ``_ResultCollection``) and each entry's
    ``_computed`` cache: what ``_ResultCollection.metrics(on_step=False)`` computes is every
    valid entry logged on epoch level whose value is a ``Metric`` without a cached value yet.
    Checked against lightning 2.4-2.6.6.
    """
    results = getattr(trainer, "_results", None)
    if results is None:
        return {}
    return {
        key: result
        for key, result in results.items()
        if not result.is_tensor
        and result.meta.on_epoch
        and not result.has_reset
        and result._computed is None
    }


def lightning_last_eval_batch(trainer: Any) -> bool:
    """Is the running validation/test batch the last? (``trainer._evaluation_loop``'s batch
    progress, set before the step from its data fetcher; lightning 2.4-2.6.6.)"""
    return bool(trainer._evaluation_loop.batch_progress.is_last_batch)


def metric_reduction(metric: Any, attr: str) -> Any:
    """The ``dist_reduce_fx`` torchmetrics registered for state ``attr`` of ``metric``
    (``Metric._reductions``: None or one of its ``dim_zero_*`` functions; torchmetrics 1.4-1.9)."""
    return metric._reductions[attr]
