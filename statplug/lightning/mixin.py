"""StatsMixin: checkpoint metadata and layout checks for a LightningModule's stats.

Mix :class:`StatsMixin` into a ``LightningModule`` (``class Model(StatsMixin, pl.LightningModule)``)
to get, with no registry to keep up to date:

* ``checkpoint["statplug"]`` on every save: the layout of every stat, mask and encoding found by
  walking ``self.modules()``, their counts, and the resolved config, in plain Python types only, so
  ``torch.load(path, weights_only=True)`` reads the file;
* a layout check on every load (``Trainer.fit(ckpt_path=...)``, ``Model.load_from_checkpoint``),
  before the state dict is loaded: a stat the checkpoint does not hold raises
  :class:`~statplug.errors.CheckpointMismatchError` instead of silently keeping fresh zeros.

The stats themselves travel in ``checkpoint["state_dict"]`` like any buffer; the metadata is for
humans and tools (``statplug inspect``) and for this check.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from statplug._buffers import PinnedDtypeModule, dtype_name, named_statplug_modules
from statplug.averaging import FIXED_ATTR
from statplug.encodings import RotaryEncoding, SinusoidalEncoding
from statplug.errors import CheckpointMismatchError
from statplug.lightning._utils import PRUNING_ATTR, pruning_masks, warn_if_resumed_mid_epoch
from statplug.masks import CausalMask, RandomMask
from statplug.stats.base import Stat

__all__ = ["CHECKPOINT_KEY", "METADATA_VERSION", "StatsMixin", "plain_config"]

CHECKPOINT_KEY = "statplug"
METADATA_VERSION = 1

# mypy sees the mixin as a LightningModule (for self.modules(), self.log, ...); at run time it is
# a plain class so that it can come first in the bases of any LightningModule subclass.
if TYPE_CHECKING:
    from lightning.pytorch import LightningModule as _Base
else:
    _Base = object


def plain_config(cfg: Any, path: str = "statplug_config") -> Any:
    """``cfg`` as plain Python containers and scalars (OmegaConf configs resolved).

    Anything else (a function, an arbitrary object) is stored as its ``repr`` with a warning: a
    checkpoint must stay loadable with ``torch.load(..., weights_only=True)``.
    """
    if isinstance(cfg, DictConfig | ListConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if cfg is None or isinstance(cfg, bool | int | str):
        return cfg
    if isinstance(cfg, float):
        return cfg if math.isfinite(cfg) else str(cfg)
    if isinstance(cfg, dict):
        return {str(k): plain_config(v, f"{path}[{k!r}]") for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [plain_config(v, f"{path}[{i}]") for i, v in enumerate(cfg)]
    if isinstance(cfg, PurePath):
        return str(cfg)
    rank_zero_warn(
        f"StatsMixin: `{path}` holds a {type(cfg).__name__}, which is not a plain Python type; it "
        "is stored as its repr so the checkpoint stays loadable with weights_only=True. Store "
        "plain values (or an OmegaConf config) in `statplug_config` to silence this warning."
    )
    return repr(cfg)


def _lightning_cli_config(module: Any) -> dict[str, Any] | None:
    """The config LightningCLI parsed for this run, as plain YAML types, if it ran one.

    LightningCLI hands its parsed config to its ``SaveConfigCallback`` (unless disabled); the
    parser dumps it to YAML with its own types (paths, class paths) already made plain.
    """
    cli = sys.modules.get("lightning.pytorch.cli")
    trainer = getattr(module, "_trainer", None)
    if cli is None or trainer is None:
        return None
    for cb in getattr(trainer, "callbacks", []):
        if isinstance(cb, cli.SaveConfigCallback):
            import yaml

            try:
                text = cb.parser.dump(cb.config, skip_none=False, skip_validation=True)
            except TypeError:  # an older jsonargparse without skip_validation
                text = cb.parser.dump(cb.config, skip_none=False)
            loaded = yaml.safe_load(text)
            return loaded if isinstance(loaded, dict) else None
    return None


@dataclass
class _Saved:
    """One stat, mask or encoding of the model as the checkpoint layout sees it."""

    name: str  # qualified module (or, for pruning masks, buffer) name
    kind: str
    module: nn.Module
    # state_dict key -> tensor of the module's persistent state (empty for derived buffers).
    keys: dict[str, Tensor]


@dataclass
class _Layout:
    """The model's stats, masks (pruning masks too) and encodings, in ``named_modules()`` order."""

    stats: list[_Saved] = field(default_factory=list)
    masks: list[_Saved] = field(default_factory=list)
    encodings: list[_Saved] = field(default_factory=list)


def _layout(root: nn.Module) -> _Layout:
    layout = _Layout()
    for name, mod in named_statplug_modules(root, PinnedDtypeModule):
        if isinstance(mod, Stat):
            group = layout.stats
        elif isinstance(mod, (CausalMask, RandomMask)):
            group = layout.masks
        elif isinstance(mod, (SinusoidalEncoding, RotaryEncoding)):
            group = layout.encodings
        else:
            continue  # a normaliser: its moments are listed as a stat
        keys = dict(mod.state_dict(prefix=f"{name}." if name else "", keep_vars=True))
        group.append(_Saved(name, type(mod).__name__, mod, keys))
    for key, owner, _, mask in pruning_masks(root):
        layout.masks.append(_Saved(key, "MagnitudePruning", owner, {key: mask}))
    return layout


def _shape_of(entry: _Saved) -> list[int]:
    shape = getattr(entry.module, "shape", None)
    if shape is not None:
        return [int(s) for s in shape]
    if len(entry.keys) == 1:  # a pruning mask: the mask's own shape
        return list(next(iter(entry.keys.values())).shape)
    return []


class StatsMixin(_Base):
    """Checkpoint metadata and layout checks for every stat, mask and encoding of a module.

    Put it before ``LightningModule`` in the bases. If the model overrides ``on_save_checkpoint``,
    ``on_load_checkpoint`` or ``on_train_start``, it must call ``super()``. A fit resumed from a
    mid-epoch checkpoint with a dataloader that cannot resume warns once, naming how many samples
    the stats will count twice (Lightning runs that epoch's first batches again).

    Attributes:
        missing_stats: what loading does when the model has a stat (or a saved mask) that the
            checkpoint does not hold, e.g. a checkpoint written before the stat was added:
            ``"raise"`` (:class:`~statplug.errors.CheckpointMismatchError` naming each one) or
            ``"init"`` (keep the fresh, empty stat and warn on rank zero). Default: ``"raise"``.
        statplug_config: optional config (a dict or an OmegaConf ``DictConfig``) saved, resolved
            and as plain containers, under ``checkpoint["statplug"]["config"``]. When it is None
            and the run was started by Lightning's ``LightningCLI``, the config LightningCLI
            parsed is saved instead (``config_source`` tells which). Default: None.

    ``checkpoint["statplug"]`` holds ``{"version": 1, "stats": [...], "masks": [...],
    "encodings": [...], "config": dict | None, "config_source": "recipe" | "LightningCLI" |
    None}``; each stat entry is ``{"name", "kind", "shape",
    "accumulator_dtype" (e.g. ``"float32"``), "count", "state" (state names), "frozen"}``, each mask
    or encoding entry ``{"name", "kind", "shape", "persistent"}`` (pruning masks, kind
    ``"MagnitudePruning"``, add ``"density"``, the fraction kept).

    Example:
        >>> import lightning.pytorch as pl
        >>> from torch import nn
        >>> from statplug import RunningNorm, StatsMixin
        >>> class Model(StatsMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm = RunningNorm(4)
        ...         self.net = nn.Linear(4, 1)
        >>> ckpt = {"state_dict": Model().state_dict()}
        >>> Model().on_save_checkpoint(ckpt)
        >>> [(s["name"], s["kind"], s["count"]) for s in ckpt["statplug"]["stats"]]
        [('norm.moments', 'RunningMoments', 0)]
    """

    missing_stats: Literal["raise", "init"] = "raise"

    # ------------------------------------------------------------------ save
    def statplug_metadata(self) -> dict[str, Any]:
        """The ``checkpoint["statplug"]`` entry for the model's current state."""
        layout = _layout(self)
        stat_entries = []
        for e in layout.stats:
            stat = e.module
            assert isinstance(stat, Stat)
            stat_entries.append(
                {
                    "name": e.name,
                    "kind": e.kind,
                    "shape": _shape_of(e),
                    "accumulator_dtype": dtype_name(stat.accumulator_dtype),
                    # Saving is not a hot path: one host read per stat is fine here.
                    "count": int(stat.count),
                    "state": list(stat.state_names),
                    "frozen": bool(stat.frozen),
                }
            )
        mask_entries = []
        for e in layout.masks:
            entry: dict[str, Any] = {
                "name": e.name,
                "kind": e.kind,
                "shape": _shape_of(e),
                "persistent": bool(e.keys),
            }
            if e.kind == "MagnitudePruning":
                mask = next(iter(e.keys.values()))
                entry["density"] = float(mask.float().mean()) if mask.numel() else 1.0
            mask_entries.append(entry)
        enc_entries = [
            {"name": e.name, "kind": e.kind, "shape": [int(getattr(e.module, "dim", 0))],
             "persistent": bool(e.keys)}
            for e in layout.encodings
        ]
        cfg = getattr(self, "statplug_config", None)
        source = None if cfg is None else "recipe"
        if cfg is None:
            cfg = _lightning_cli_config(self)
            source = None if cfg is None else "LightningCLI"
        return {
            "version": METADATA_VERSION,
            "stats": stat_entries,
            "masks": mask_entries,
            "encodings": enc_entries,
            "config": None if cfg is None else plain_config(cfg),
            "config_source": source,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write ``checkpoint["statplug"]`` (after the next ``on_save_checkpoint`` in the MRO)."""
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        checkpoint[CHECKPOINT_KEY] = self.statplug_metadata()

    # ------------------------------------------------------------------ resume
    def on_train_start(self) -> None:
        """Warn once if the fit resumed mid-epoch with a dataloader that cannot resume: Lightning
        then runs some of the epoch's batches again, and the stats would count them twice."""
        parent = getattr(super(), "on_train_start", None)
        if parent is not None:
            parent()
        warn_if_resumed_mid_epoch(self.trainer, self, "StatsMixin")

    # ------------------------------------------------------------------ load
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint holds every stat (runs before ``load_state_dict``).

        Raises:
            CheckpointMismatchError: a stat or saved mask of the model is missing from
                ``checkpoint["state_dict"]`` and ``missing_stats == "raise"``.
        """
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        meta = checkpoint.get(CHECKPOINT_KEY)
        if isinstance(meta, dict) and int(meta.get("version", METADATA_VERSION)) > METADATA_VERSION:
            rank_zero_warn(
                f"StatsMixin: the checkpoint's statplug metadata has version {meta['version']}, "
                f"newer than this statplug's {METADATA_VERSION}; the layout check may miss "
                "changes. Upgrade statplug to silence this warning."
            )
        state_dict = checkpoint.get("state_dict")
        if not isinstance(state_dict, dict):
            return  # nothing to check (e.g. a weights-only export without Lightning's layout)
        if isinstance(meta, dict):
            self._add_pruning_masks(meta, state_dict)
        self._check_layout(state_dict)

    def _add_pruning_masks(self, meta: dict[str, Any], state_dict: dict[str, Any]) -> None:
        """Register the pruning masks the checkpoint holds but a fresh model lacks.

        ``MagnitudePruning`` registers them in ``setup``; ``Model.load_from_checkpoint`` has no
        Trainer and no callback, so without this strict loading would fail on unexpected keys.
        """
        for entry in meta.get("masks", []):
            key = entry.get("name", "") if isinstance(entry, dict) else ""
            if entry.get("kind") != "MagnitudePruning" or key not in state_dict:
                continue
            mod_name, _, buf_name = key.rpartition(".")
            try:
                mod = self.get_submodule(mod_name)
            except AttributeError:
                continue  # the layer is gone: strict loading reports the unexpected key
            param_name = buf_name.removesuffix("_mask")
            param = mod._parameters.get(param_name)
            if buf_name in mod._buffers or param is None:
                continue
            mod.register_buffer(buf_name, torch.ones_like(param, dtype=torch.bool))
            setattr(mod, PRUNING_ATTR, {**getattr(mod, PRUNING_ATTR, {}), param_name: buf_name})
            # Marked fixed as MagnitudePruning marks it: the audit watches it, and weight
            # averaging (statplug.averaging.state_buffers) copies it instead of averaging it.
            fixed = tuple(getattr(mod, FIXED_ATTR, ()))
            if buf_name not in fixed:
                setattr(mod, FIXED_ATTR, (*fixed, buf_name))

    def _check_layout(self, state_dict: dict[str, Any]) -> None:
        layout = _layout(self)
        missing = [
            e
            for e in layout.stats + layout.masks
            if e.keys and not any(k in state_dict for k in e.keys)
        ]
        if not missing:
            return
        names = ", ".join(f"{e.name!r} ({e.kind})" for e in missing)
        policy = getattr(self, "missing_stats", "raise")
        if policy not in ("raise", "init"):
            raise ValueError(
                f"{type(self).__name__}.missing_stats must be 'raise' or 'init', got {policy!r}"
            )
        if policy == "raise":
            raise CheckpointMismatchError(
                f"the checkpoint holds no state for {len(missing)} stat(s)/mask(s) of "
                f"{type(self).__name__}: {names} (expected keys such as "
                f"{next(iter(missing[0].keys))!r}). It was probably written by a version of the "
                "model without them. To load it anyway and start these from scratch, set the "
                f"class attribute `missing_stats = \"init\"` on {type(self).__name__}"
            )
        for e in missing:
            for key, value in e.keys.items():
                # Fresh values as the model holds them now (just built): strict loading succeeds.
                state_dict[key] = value.detach().clone()
        rank_zero_warn(
            f"{type(self).__name__}: the checkpoint holds no state for {names}; they start empty "
            "(missing_stats='init'). Save a new checkpoint to include them and silence this "
            "warning."
        )
