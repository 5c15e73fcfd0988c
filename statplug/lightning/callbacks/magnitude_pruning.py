r"""
Magnitude pruning
=================

Prune the smallest-magnitude weights of chosen layers at epoch ends, with masks held as persistent
bool buffers on the pruned modules.

Design choices (see DESIGN.md §2 and §5):

* The mask of ``layer.weight`` is the buffer ``layer.weight_mask`` (bool, True = kept), registered
  in ``setup``, before a checkpoint is restored, so strict loading finds it; it is in the model's
  ``state_dict`` and so in every checkpoint, and being a buffer it is never in an optimizer.
* The mask is applied by a forward pre-hook that multiplies the weight in place. The parameter
  stays ``layer.weight`` (``torch.nn.utils.parametrize`` would rename it to
  ``parametrizations.weight.original``), so the model's state dict loads into the unpruned model.
  The hook multiplies only when the weight changed since it last did (the tensor's version counter
  moved: an optimizer step, a load), so a forward costs one integer comparison per pruned tensor
  and two forwards in one step never modify a tensor that autograd saved for the backward pass.
* Starting to prune from a checkpoint written without pruning: its state dict lacks the masks. A
  ``StatsMixin`` model loads it with ``missing_stats = "init"`` (masks start all True); otherwise
  load the weights first (``Model.load_from_checkpoint``) and ``fit`` without ``ckpt_path``.
* ``Model.load_from_checkpoint`` builds a fresh model, without masks, and loads strictly: only
  ``StatsMixin``'s load hook registers the masks the file holds. A fit on a ``LightningModule``
  without the mixin therefore stops in ``setup``, before any checkpoint that could not be loaded
  back is written, with one line naming the fix (``CheckpointMismatchError``).
* Masks are computed from the weights alone (stable sort of ``|w|``, ties broken by position),
  which DDP keeps identical on every rank, so the masks are identical too without communication.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from statplug.averaging import FIXED_ATTR
from statplug.errors import CheckpointMismatchError
from statplug.lightning._utils import PRUNING_ATTR, matches
from statplug.lightning.mixin import StatsMixin

__all__ = ["MagnitudePruning"]

log = logging.getLogger(__name__)

Amount = float | Callable[[int], float]
Schedule = Iterable[int] | Callable[[int], bool] | None
PruningListener = Callable[["pl.Trainer", "pl.LightningModule", str], None]


def _check_amount(value: Any, epoch: int | None = None) -> float:
    where = "" if epoch is None else f" (returned for epoch {epoch})"
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"MagnitudePruning: `amount` must be a fraction in [0, 1) of the weights to prune, "
            f"got {value!r}{where}"
        )
    return float(value)


def _require_mixin(pl_module: pl.LightningModule) -> None:
    """Fail at fit start when the run's checkpoints could not be loaded back.

    ``Model.load_from_checkpoint`` builds a fresh model, which has no mask buffers (this callback
    registers them in ``setup``), and loads strictly: only :class:`StatsMixin`'s load hook
    registers the masks a checkpoint holds. Nothing outside the class can add that hook.
    """
    if isinstance(pl_module, StatsMixin):
        return
    name = type(pl_module).__name__
    raise CheckpointMismatchError(
        f"MagnitudePruning: {name} does not mix in StatsMixin, so its checkpoints would hold mask "
        f"buffers (`*.weight_mask`) that `{name}.load_from_checkpoint` refuses as unexpected "
        f"keys. Add the mixin first in its bases: `class {name}(StatsMixin, "
        "pl.LightningModule)`"
    )


class MagnitudePruning(Callback):
    r"""Prune the smallest weights at epoch ends; masks are persistent buffers applied in forward.

    At the end of each scheduled training epoch, the weights of every matching module are ranked by
    magnitude and the smallest ``amount`` of them are masked to zero (``amount`` is the total
    fraction pruned after that epoch, not an increment: already-pruned weights are zero, so they
    stay pruned while the amount grows).

    Args:
        amount: fraction in ``[0, 1)`` of the weights to prune, or ``amount(epoch) -> fraction``
            for a schedule by epoch (``epoch`` is the 0-based epoch that just ended).
        schedule: the epochs at whose end to prune: None (every epoch), an iterable of epochs, or
            ``schedule(epoch) -> bool``. Default: None.
        parameter_names: parameters of each module to prune. Default: ``("weight",)``.
        modules: module types to prune. Default: ``(nn.Linear, nn.Conv2d)``.
        patterns: glob patterns (``fnmatch``) on qualified module names; a module is pruned when
            its type is in ``modules`` and its name matches one. Default: ``("*",)``.
        scope: ``"layer"`` (each tensor loses ``amount`` of its own weights) or ``"global"`` (one
            magnitude threshold across all pruned tensors). Default: ``"layer"``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from statplug import MagnitudePruning
        >>> pruning = MagnitudePruning(lambda epoch: min(0.2 * (epoch + 1), 0.8), scope="global")
        >>> trainer = pl.Trainer(callbacks=[pruning], accelerator="cpu", logger=False)
        >>> pruning.amount_at(0), pruning.amount_at(9)
        (0.2, 0.8)
    """

    def __init__(
        self,
        amount: Amount,
        *,
        schedule: Schedule = None,
        parameter_names: Sequence[str] = ("weight",),
        modules: Sequence[type[nn.Module]] = (nn.Linear, nn.Conv2d),
        patterns: Sequence[str] = ("*",),
        scope: Literal["layer", "global"] = "layer",
    ) -> None:
        if not callable(amount):
            _check_amount(amount)
        if scope not in ("layer", "global"):
            raise ValueError(
                f"MagnitudePruning: `scope` must be 'layer' or 'global', got {scope!r}"
            )
        if isinstance(parameter_names, str) or not parameter_names:
            raise ValueError(
                "MagnitudePruning: `parameter_names` must be a non-empty sequence of names, got "
                f"{parameter_names!r}"
            )
        self.amount = amount
        self._schedule_arg = schedule if schedule is None or callable(schedule) else sorted(
            int(e) for e in schedule
        )
        self.schedule: Callable[[int], bool] | None
        if schedule is None or callable(schedule):
            self.schedule = schedule
        else:
            epochs = frozenset(int(e) for e in schedule)
            self.schedule = epochs.__contains__
        self.parameter_names = tuple(parameter_names)
        self.module_types = tuple(modules)
        self.patterns = tuple(patterns)
        self.scope = scope
        self.current_amount = 0.0
        self.last_pruned_epoch = -1
        self.n_rounds = 0
        self._handles: list[RemovableHandle] = []
        self._hooked: list[nn.Module] = []
        # (module id, parameter name) -> parameter version right after the mask was applied.
        self._versions: dict[tuple[int, str], int] = {}
        self._listeners: list[PruningListener] = []
        # Lightning reads state_key around every hook call (profiler names): build it once.
        self._state_key = self._generate_state_key(
            parameter_names=self.parameter_names,
            modules=[t.__name__ for t in self.module_types],
            patterns=self.patterns,
            scope=self.scope,
        )

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(amount={self.amount!r}, schedule={self._schedule_arg!r}, "
            f"parameter_names={list(self.parameter_names)!r}, "
            f"modules={[t.__name__ for t in self.module_types]!r}, "
            f"patterns={list(self.patterns)!r}, scope={self.scope!r})"
        )

    def amount_at(self, epoch: int) -> float:
        """The fraction pruned after ``epoch``."""
        if callable(self.amount):
            return _check_amount(self.amount(epoch), epoch)
        return float(self.amount)

    def add_listener(self, fn: PruningListener) -> None:
        """Call ``fn(trainer, pl_module, event)`` with ``"before_pruning"``/``"after_pruning"``."""
        if fn not in self._listeners:
            self._listeners.append(fn)

    # ------------------------------------------------------------------ masks
    def pruned(self, pl_module: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
        """``(module name, module, parameter name, mask buffer name)`` of every pruned tensor."""
        out = []
        for name, mod in pl_module.named_modules():
            if not name or not isinstance(mod, self.module_types):
                continue
            if not matches(name, self.patterns):
                continue
            for pname in self.parameter_names:
                if isinstance(mod._parameters.get(pname), Tensor):
                    out.append((name, mod, pname, f"{pname}_mask"))
        return out

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Registered here, before a checkpoint is restored: a buffer registered in on_fit_start
        # or later would make strict loading fail with "Unexpected key(s)". The hooks stay after
        # the run (the model keeps applying its masks); a new setup replaces them.
        if trainer is not None and stage == "fit" and isinstance(pl_module, pl.LightningModule):
            _require_mixin(pl_module)
        self._remove_hooks()
        targets = self.pruned(pl_module)
        if not targets:
            rank_zero_warn(
                f"MagnitudePruning: no module of type {[t.__name__ for t in self.module_types]} "
                f"matching {list(self.patterns)} has parameters {list(self.parameter_names)}; "
                "nothing will be pruned. Check `modules`, `patterns` and `parameter_names`."
            )
        hooked: set[int] = set()
        for _, mod, pname, bname in targets:
            if bname not in mod._buffers:
                param = mod._parameters[pname]
                assert param is not None
                mod.register_buffer(bname, torch.ones_like(param, dtype=torch.bool))
            masks: dict[str, str] = dict(getattr(mod, PRUNING_ATTR, {}))
            masks[pname] = bname
            setattr(mod, PRUNING_ATTR, masks)
            # The audit's fixed-buffer check watches the masks between pruning rounds.
            fixed = tuple(getattr(mod, FIXED_ATTR, ()))
            if bname not in fixed:
                setattr(mod, FIXED_ATTR, (*fixed, bname))
            if id(mod) not in hooked:
                hooked.add(id(mod))
                self._hooked.append(mod)
                self._handles.append(mod.register_forward_pre_hook(self._apply_hook))
        log.debug("MagnitudePruning: %d tensors masked", len(targets))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()
        self._versions.clear()

    def _apply_hook(self, module: nn.Module, args: Any) -> None:
        self._apply(module)

    def _apply(self, module: nn.Module, force: bool = False) -> None:
        for pname, bname in getattr(module, PRUNING_ATTR, {}).items():
            param = module._parameters.get(pname)
            mask = module._buffers.get(bname)
            if param is None or mask is None:
                continue
            key = (id(module), pname)
            if force or self._versions.get(key) != param._version:
                with torch.no_grad():
                    param.mul_(mask)
                self._versions[key] = param._version

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Re-mask right after the optimizer step (which moves pruned weights through their
        # gradients), so a checkpoint saved now holds pruned weights; the next forward then has
        # nothing to do.
        for mod in self._hooked:
            self._apply(mod)

    def _due(self, epoch: int) -> bool:
        return epoch >= 0 and (self.schedule is None or self.schedule(epoch))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint saved on validation end (ModelCheckpoint's default when there is a
        # validation loop) is written before on_train_epoch_end, and a run resumed from it starts
        # with the next epoch: the round of the epoch that ended is done here instead. The weights
        # have not changed since, so the masks are those of an uninterrupted run.
        previous = trainer.current_epoch - 1
        if self._due(previous) and self.last_pruned_epoch < previous:
            self._round(trainer, pl_module, previous)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._due(epoch):
            self._round(trainer, pl_module, epoch)

    def _round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        for fn in self._listeners:
            fn(trainer, pl_module, "before_pruning")
        self.prune_(pl_module, self.amount_at(epoch))
        self.last_pruned_epoch = epoch
        for fn in self._listeners:
            fn(trainer, pl_module, "after_pruning")

    @torch.no_grad()
    def prune_(self, pl_module: nn.Module, amount: float) -> None:
        """Recompute every mask so that ``amount`` of the weights are pruned, and apply them."""
        amount = _check_amount(amount)
        targets = [
            (mod, pname, bname)
            for _, mod, pname, bname in self.pruned(pl_module)
            if bname in mod._buffers
        ]
        if not targets:
            return
        magnitudes = []
        for mod, pname, _ in targets:
            p = mod._parameters[pname]
            assert p is not None
            magnitudes.append(p.detach().abs().reshape(-1).float())
        if self.scope == "global":
            keeps = self._keep(torch.cat(magnitudes), amount).split([m.numel() for m in magnitudes])
        else:
            keeps = tuple(self._keep(m, amount) for m in magnitudes)
        for (mod, _, bname), keep in zip(targets, keeps, strict=True):
            mask = mod._buffers[bname]
            assert mask is not None
            mask.copy_(keep.view(mask.shape))
        for mod in {id(m): m for m, _, _ in targets}.values():
            self._apply(mod, force=True)
        self.current_amount = amount
        self.n_rounds += 1
        log.debug("MagnitudePruning: pruned %.3f of %d tensors", amount, len(targets))

    @staticmethod
    def _keep(magnitudes: Tensor, amount: float) -> Tensor:
        """Bool keep-mask pruning the ``round(amount * n)`` smallest (stable: ties by position)."""
        n = magnitudes.numel()
        k = min(math.floor(amount * n + 0.5), n)
        keep = torch.ones(n, dtype=torch.bool, device=magnitudes.device)
        if k > 0:
            keep[torch.argsort(magnitudes, stable=True)[:k]] = False
        return keep

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "current_amount": self.current_amount,
            "last_pruned_epoch": self.last_pruned_epoch,
            "n_rounds": self.n_rounds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_amount = float(state_dict.get("current_amount", 0.0))
        self.last_pruned_epoch = int(state_dict.get("last_pruned_epoch", -1))
        self.n_rounds = int(state_dict.get("n_rounds", 0))
        # The masks themselves came back with the model's state dict; the weights were saved
        # masked, and the hook re-applies the masks after the load changed their versions.
