"""Helpers shared by the mixin and the callbacks (private)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from statplug.encodings import RotaryEncoding, SinusoidalEncoding
from statplug.masks import CausalMask, RandomMask
from statplug.stats.base import Stat

__all__ = [
    "PRUNING_ATTR",
    "TrackedBuffer",
    "checkpoint_due_after_batch",
    "matches",
    "process_group",
    "pruning_masks",
    "settle",
]

# Set by MagnitudePruning on each pruned module: {parameter name: mask buffer name}.
PRUNING_ATTR = "_statplug_pruning_masks"

_MASKS = (CausalMask, RandomMask)
_ENCODINGS = (SinusoidalEncoding, RotaryEncoding)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether the qualified module ``name`` matches any glob pattern (``fnmatch``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def process_group(trainer: pl.Trainer) -> dist.ProcessGroup | None:
    """The process group the strategy communicates over (None: the default world group)."""
    model = trainer.strategy.model
    if isinstance(model, DistributedDataParallel):
        return model.process_group  # type: ignore[no-any-return]
    group = getattr(trainer.strategy, "process_group", None)
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


def settle(stats: Iterable[Stat]) -> None:
    """Settle each stat (:meth:`Stat.settle_`): its state becomes exactly what a reload gives.

    A stat keeps float64 working sums but saves its ``accumulator_dtype`` values, so a run resumed
    from a checkpoint restarts from the rounded values. Settling the stats where a checkpoint may
    be written (right after a sync, when every rank holds the global state and no data is
    pending) makes the uninterrupted run take the same path, so fit 2N == fit N + resume N bit
    for bit. On one process it also folds the local data into the agreed base, as a sync with one
    rank would; after a real sync there is no local data left to fold.
    """
    with torch.no_grad():
        for stat in stats:
            stat.settle_()


def pruning_masks(root: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """``(qualified buffer name, module, parameter name, mask)`` of every pruning mask."""
    for mod_name, mod in root.named_modules():
        for param_name, buf_name in getattr(mod, PRUNING_ATTR, {}).items():
            mask = mod._buffers.get(buf_name)
            if mask is not None:
                prefix = f"{mod_name}." if mod_name else ""
                yield prefix + buf_name, mod, param_name, mask


@dataclass
class TrackedBuffer:
    """One stat, mask or encoding of a model as the checkpoint layout sees it."""

    name: str  # qualified module (or, for pruning masks, buffer) name
    kind: str
    module: nn.Module
    # state_dict key -> tensor of the module's persistent state (empty for derived buffers).
    keys: dict[str, Tensor]


Tracked = list[TrackedBuffer]


def tracked(root: nn.Module) -> tuple[Tracked, Tracked, Tracked]:
    """The stats, masks and encodings of ``root``, found by walking ``named_modules()``."""
    stats: list[TrackedBuffer] = []
    masks: list[TrackedBuffer] = []
    encodings: list[TrackedBuffer] = []
    for name, mod in root.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, (Stat, *_MASKS, *_ENCODINGS)):
            # state_dict, not _buffers: a RunningMoments materialises pending work on save.
            keys = dict(mod.state_dict(prefix=prefix, keep_vars=True))
            entry = TrackedBuffer(name, type(mod).__name__, mod, keys)
            if isinstance(mod, Stat):
                mod._statplug_name = name or None
                stats.append(entry)
            elif isinstance(mod, _MASKS):
                masks.append(entry)
            else:
                encodings.append(entry)
    for key, mod, _, mask in pruning_masks(root):
        masks.append(TrackedBuffer(key, "MagnitudePruning", mod, {key: mask}))
    return stats, masks, encodings
