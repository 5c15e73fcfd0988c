"""Helpers shared by the mixin and the callbacks (private)."""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from statplug._buffers import named_statplug_modules
from statplug.stats.base import Stat

__all__ = [
    "PRUNING_ATTR",
    "checkpoint_due_after_batch",
    "matches",
    "process_group",
    "pruning_masks",
    "warn_if_resumed_mid_epoch",
]

# Set by MagnitudePruning on each pruned module: {parameter name: mask buffer name}.
PRUNING_ATTR = "_statplug_pruning_masks"


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether the qualified module ``name`` matches any glob pattern (``fnmatch``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def callbacks_of(trainer: pl.Trainer) -> list[pl.Callback]:
    """The trainer's callbacks (``Trainer.callbacks`` is set in its constructor, untyped)."""
    return list(trainer.callbacks)  # type: ignore[attr-defined]


def process_group(trainer: pl.Trainer) -> dist.ProcessGroup | None:
    """The process group the strategy communicates over (None: the default world group)."""
    model = trainer.strategy.model
    owner = model if isinstance(model, DistributedDataParallel) else trainer.strategy
    group = getattr(owner, "process_group", None)
    return group if isinstance(group, dist.ProcessGroup) else None


def checkpoint_due_after_batch(trainer: pl.Trainer) -> bool:
    """Whether a step-based ``ModelCheckpoint`` saves in this ``on_train_batch_end``.

    Mirrors ``ModelCheckpoint``'s own test (``global_step % every_n_train_steps == 0``), which every
    rank evaluates identically, so a sync decided here is a collective every rank joins.
    """
    step = trainer.global_step
    for cb in trainer.checkpoint_callbacks:
        n = getattr(cb, "_every_n_train_steps", 0) or 0
        if n >= 1 and step % n == 0:
            return True
    return False


# Trainers already warned about a mid-epoch resume: the mixin and SyncStats both check, once.
_RESUME_WARNED: weakref.WeakKeyDictionary[pl.Trainer, object] = weakref.WeakKeyDictionary()


def leaves(loaders: Any) -> list[Any]:
    """The dataloaders in what ``trainer.train_dataloader`` returns (one, or a collection)."""
    if isinstance(loaders, Mapping):
        return [leaf for v in loaders.values() for leaf in leaves(v)]
    if isinstance(loaders, list | tuple):
        return [leaf for v in loaders for leaf in leaves(v)]
    return [] if loaders is None else [loaders]


def _batch_size(loader: Any) -> int | None:
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) else None


def warn_if_resumed_mid_epoch(trainer: pl.Trainer, pl_module: nn.Module, owner: str) -> None:
    """Warn once when a fit resumed mid-epoch with a dataloader that cannot resume.

    Call in ``on_train_start``. Lightning then starts the epoch's data again from its first
    batch and ends the epoch after the batches it had left: of the ``done`` batches run before
    the checkpoint, ``min(done, total - done)`` are run (and counted by every stat) again, and as
    many of the epoch's last batches are not run at all.
    """
    if trainer in _RESUME_WARNED or trainer.ckpt_path is None:
        return
    _RESUME_WARNED[trainer] = trainer.ckpt_path
    # The epoch's batches fetched before the save; Lightning counts the restarted epoch from here.
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    total = trainer.num_training_batches
    if not (isinstance(total, int) and 0 < done < total):
        return  # saved at an epoch end (or an iterable without length): nothing runs twice
    loaders = leaves(trainer.train_dataloader)
    if all(hasattr(dl, "state_dict") and hasattr(dl, "load_state_dict") for dl in loaders):
        return  # Lightning restores the loaders' position
    from statplug.lightning.callbacks.activation_stats import ActivationStats

    has_stats = bool(named_statplug_modules(pl_module, Stat)) or any(
        isinstance(cb, ActivationStats) for cb in callbacks_of(trainer)
    )
    if not has_stats:
        return
    twice = min(done, total - done)
    sizes = [s for s in map(_batch_size, loaders) if s is not None]
    known = bool(sizes) and len(sizes) == len(loaders)
    samples = (f"{twice * sum(sizes):,} samples" if known else "their samples") + (
        f" on each of {trainer.world_size} processes" if trainer.world_size > 1 else ""
    )
    rank_zero_warn(
        f"{owner}: resuming from a checkpoint saved after batch {done} of {total} in epoch "
        f"{trainer.current_epoch}, with a dataloader that cannot resume mid-epoch: Lightning "
        f"starts the epoch's data again from its first batch, so the stats will count "
        f"{twice} batches ({samples}) a second time, and not see the epoch's last {twice}. "
        "Resume from a checkpoint saved at an epoch end, or give the dataloader `state_dict` / "
        "`load_state_dict` (e.g. torchdata's StatefulDataLoader), to avoid this."
    )


def pruning_masks(root: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """``(qualified buffer name, module, parameter name, mask)`` of every pruning mask."""
    for mod_name, mod in root.named_modules():
        for param_name, buf_name in getattr(mod, PRUNING_ATTR, {}).items():
            mask = mod._buffers.get(buf_name)
            if mask is not None:
                prefix = f"{mod_name}." if mod_name else ""
                yield prefix + buf_name, mod, param_name, mask
