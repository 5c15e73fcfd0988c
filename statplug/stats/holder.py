"""The base of modules whose statistics are one :class:`Stat` they hold (the normalisers)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from typing_extensions import Self

from statplug._buffers import PinnedDtypeModule
from statplug.stats.base import Stat
from statplug.stats.merge import host_reads_free

__all__ = ["StatHolder"]


class StatHolder(PinnedDtypeModule):
    """A module holding one stat as a submodule, so it is saved, moved, synced and audited like
    any stat; the rules every stat follows (update, check, merge, reset, freeze, the count) are
    forwarded to it. Subclasses name the submodule in ``_held``."""

    _held: str  # the attribute holding the stat ("moments", "sketch")
    clip: float | None = None  # a normaliser's output bound, if any

    @property
    def held_stat(self) -> Stat:
        stat = getattr(self, self._held)
        assert isinstance(stat, Stat)
        return stat

    @property
    def count(self) -> Tensor:
        return self.held_stat.count

    @property
    def n_skipped(self) -> Tensor:
        return self.held_stat.n_skipped

    def update(
        self, x: Tensor, mask: Tensor | None = None, weight: Tensor | None = None
    ) -> None:
        """Update the statistics with ``x`` without normalising (as in ``train()`` mode); see
        :meth:`Stat.update` for ``mask`` and ``weight``."""
        self.held_stat.update(x, mask, weight)

    def check(self) -> Self:
        """Raise now a bad batch the raise policy left out on the device (see ``Stat.check``)."""
        self.held_stat.check()
        return self

    def merge_(self, other: Self) -> Self:
        """Merge another normaliser's statistics (same class and configuration) exactly."""
        name = type(self).__name__
        if not isinstance(other, type(self)):
            raise ValueError(f"{name}.merge_: expected a {name}, got {type(other).__name__}")
        self.held_stat.merge_(other.held_stat)
        return self

    def reset(self) -> None:
        """Forget every sample (keeps frozen-ness)."""
        self.held_stat.reset()

    def freeze(self) -> Self:
        """Stop updating the statistics (saved with the state)."""
        self.held_stat.freeze()
        return self

    def unfreeze(self) -> Self:
        self.held_stat.unfreeze()
        return self

    @property
    def frozen(self) -> bool:
        return self.held_stat.frozen

    def _until_ready(
        self, params: tuple[Tensor, Tensor], identity: tuple[float, float]
    ) -> tuple[Tensor, Tensor, bool | Tensor]:
        """``params`` once two samples were seen, else the constants ``identity`` that make the
        normaliser the identity; and whether they were seen. Decided on the host when that is
        free (the CPU, eager), on the device otherwise."""
        count = self.held_stat.count
        a, b = params
        if host_reads_free(count):
            if int(count) >= 2:
                return a, b, True
            return torch.full_like(a, identity[0]), torch.full_like(b, identity[1]), False
        ready = count >= 2
        return torch.where(ready, a, identity[0]), torch.where(ready, b, identity[1]), ready

    def _clipped(self, y: Tensor, ready: bool | Tensor) -> Tensor:
        """``y`` clipped to ``[-clip, clip]`` when ``clip`` is set, except the identity's."""
        if self.clip is None or ready is False:  # never clip the identity
            return y
        if ready is True:
            return y.clamp(-self.clip, self.clip)
        bound = torch.where(ready, self.clip, math.inf).to(y.dtype)
        return torch.clamp(y, -bound, bound)
