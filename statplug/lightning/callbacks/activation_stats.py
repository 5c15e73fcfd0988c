r"""
Activation stats
================

Exact running mean, variance and min/max of the outputs of chosen layers, per feature, kept by the
callback (the model is untouched: its ``state_dict`` loads without statplug) and saved in the
callback's checkpoint state.

Which feature axis:

* by default the **last** dimension; all leading dims are samples (``[B, F]`` and ``[B, T, F]``);
* **channels** (dim 1) for outputs with 4 or more dims (``[B, C, H, W]``, ``[B, C, D, H, W]``,
  PyTorch's channels-first convention) and for 3-D outputs of convolution, batch/instance norm
  and pooling layers (``[B, C, L]``): the channel axis is moved last before the update (one copy);
* ``channels="last"`` always uses the last dimension.

The axis of each layer is chosen at its first training forward and saved with its stats.

When: stats are created lazily at a layer's first training forward (their shape is known then),
updated only in training forward passes (between ``on_train_batch_start`` and
``on_train_batch_end``, with the layer in training mode), without building a graph or reading a
value on the host. With ``every_n_steps=n`` only every ``n``-th optimizer step is recorded (all
its batches under gradient accumulation): the stats are then exact over the sampled batches.
They are merged across ranks (:func:`statplug.sync_stats` over the callback's stats, one
coalesced sync for all layers) on the schedule of :class:`~statplug.lightning.SyncStats`
(:mod:`statplug.lightning.callbacks._sync_schedule`): epoch end, validation start and end, before
a step-based ``ModelCheckpoint`` saves, at the end of training, and every ``log_every_n_steps``
steps. At epoch end (and every
``log_every_n_steps`` steps, after a sync) each layer's summary is logged the way
:class:`~statplug.lightning.StatsMonitor` logs a stat: straight to the Trainer's loggers on rank
zero (the values are global, so there is no ``sync_dist`` warning), into
``trainer.callback_metrics``, and as per-feature histograms where the logger supports them. Keys:
``activations/<layer>/count``, ``mean``, ``std`` (averaged over features), ``n_skipped``,
``drift``, ``drift_mean``, ``std_drift`` (see StatsMonitor), and with ``log_min_max=True``
``min`` and ``max`` over features. Rows carry ``epoch`` and Lightning's ``step``, as
StatsMonitor's do.

With ``quantiles=(0.001, 0.999)`` each layer also keeps a
:class:`~statplug.stats.RunningQuantiles` (outliers, calibration ranges), synced and saved with
the rest, and logs ``q<p>`` for each probability (``activations/<layer>/q0.999``): the lowest
over features for ``p < 0.5``, the highest for ``p > 0.5`` (the range calibration must cover),
the mean over features for the median.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _MaxPoolNd,
)
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from statplug._buffers import dtype_name
from statplug.distributed import SyncReport, sync_stats
from statplug.distributed.group import group_device
from statplug.lightning._logging import DriftTracker, LogBatch, emit, quantile_readout, readout
from statplug.lightning._utils import matches, process_group
from statplug.lightning.callbacks._sync_schedule import SyncPoint, SyncSchedule
from statplug.stats import RunningMinMax, RunningMoments, RunningQuantiles, Stat
from statplug.stats.base import real_number

__all__ = ["ActivationStats"]

log = logging.getLogger(__name__)

_CHANNEL_FIRST_TYPES = (
    _ConvNd,
    _BatchNorm,
    _InstanceNorm,
    _MaxPoolNd,
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
)
_FAST_DTYPES = (torch.float32, torch.float64)


@dataclass
class _LayerStats:
    feature_dim: int  # 1 (channels) or -1 (last)
    moments: RunningMoments
    minmax: RunningMinMax | None
    quantiles: RunningQuantiles | None = None

    def stats(self) -> list[Stat]:
        return [s for s in (self.moments, self.minmax, self.quantiles) if s is not None]

    def to(self, device: torch.device) -> None:
        for s in self.stats():
            s.to(device)


class ActivationStats(SyncSchedule):
    r"""Running moments and min/max of layer outputs, synced, logged and checkpointed.

    Args:
        patterns: glob patterns (``fnmatch``) on qualified module names (``"encoder.*"``,
            ``"*.fc?"``); every matching submodule except the root is hooked. ``"*"`` matches
            containers too; a container whose output is the very tensor a recorded child
            returned (a ``Sequential``) is not recorded again. Default: ``("*",)``.
        min_max: also keep a :class:`~statplug.stats.RunningMinMax` per layer. Default: True.
        every_n_steps: record only every ``n``-th optimizer step (sampling: cuts the per-step
            cost by ``n``; the stats are exact over the sampled batches). Default: 1 (every step).
        log_every_n_steps: also sync and log every ``n`` optimizer steps (every rank joins the
            sync; each log reads values on the host). Default: None (epoch ends only).
        log_min_max: also log each layer's minimum and maximum over features (they are always
            kept and saved). Default: False.
        histograms: log per-feature histograms where a logger supports them (TensorBoard).
            Default: True.
        channels: ``"auto"`` (see the module docstring) or ``"last"``. Default: ``"auto"``.
        accumulator_dtype: of the stats. Default: ``torch.float32``.
        prefix: of the logged keys. Default: ``"activations"``.
        mask_fn: ``mask_fn(batch)`` returns the training batch's padding mask (bool, True =
            real data, e.g. ``[B, T]`` for token activations ``[B, T, F]``) or None. It is
            applied to every hooked output whose sample dims have the mask's shape (rows it
            marks False are not counted); other outputs (pooled ``[B, F]``, say) are recorded
            whole. Default: None (every row counts).
        quantiles: probabilities whose per-feature quantiles to keep and log (a
            :class:`~statplug.stats.RunningQuantiles` per layer: ``2 * quantile_buckets + 1``
            int64 counts per feature, twice with the copy a sync compares against, so 64 KiB
            per feature at the default). Default: None (no quantiles).
        quantile_accuracy: relative accuracy of those quantiles. Default: 0.01.
        quantile_buckets: buckets per sign and feature (the magnitudes resolved; see
            ``RunningQuantiles.magnitude_range``). Default: 2048.

    Attributes:
        layer_stats: ``{layer name: (moments, minmax or None)}``, in creation order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from statplug import ActivationStats
        >>> cb = ActivationStats(["body.*"])
        >>> model = nn.Module()
        >>> model.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> cb.attach(model)                     # what ``setup`` does
        >>> with cb.recording():                 # what a training step does
        ...     _ = model.body(torch.randn(8, 3))
        >>> sorted(cb.layer_stats), int(cb.layer_stats["body.1"][0].count)
        (['body.0', 'body.1'], 8)
        >>> bool((cb.layer_stats["body.1"][1].min >= 0).all())   # after the ReLU
        True
    """

    def __init__(
        self,
        patterns: tuple[str, ...] | list[str] = ("*",),
        *,
        min_max: bool = True,
        every_n_steps: int = 1,
        log_every_n_steps: int | None = None,
        log_min_max: bool = False,
        histograms: bool = True,
        channels: Literal["auto", "last"] = "auto",
        accumulator_dtype: torch.dtype = torch.float32,
        prefix: str = "activations",
        mask_fn: Callable[[Any], Tensor | None] | None = None,
        quantiles: tuple[float, ...] | list[float] | None = None,
        quantile_accuracy: float = 0.01,
        quantile_buckets: int = 2048,
    ) -> None:
        if isinstance(patterns, str):
            patterns = (patterns,)
        if not patterns:
            raise ValueError("ActivationStats: `patterns` must name at least one glob pattern")
        if channels not in ("auto", "last"):
            raise ValueError(
                f"ActivationStats: `channels` must be 'auto' or 'last', got {channels!r}"
            )
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or (
            every_n_steps < 1
        ):
            raise ValueError(
                f"ActivationStats: `every_n_steps` must be a positive int, got {every_n_steps!r}"
            )
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or int(log_every_n_steps) < 1
        ):
            raise ValueError(
                "ActivationStats: `log_every_n_steps` must be a positive int or None, got "
                f"{log_every_n_steps!r}"
            )
        if quantiles is not None:
            if isinstance(quantiles, (int, float)):
                quantiles = (quantiles,)
            quantiles = tuple(
                real_number("ActivationStats", "quantiles", q, low=0.0, high=1.0,
                            expected="probabilities in [0, 1]")
                for q in quantiles
            )
            if not quantiles:
                raise ValueError(
                    "ActivationStats: `quantiles` must name at least one probability or be None"
                )
            # Built once: the arguments are checked here, not at the first training step.
            RunningQuantiles(1, relative_accuracy=quantile_accuracy, max_buckets=quantile_buckets)
        super().__init__()
        self.quantiles = quantiles
        self.quantile_accuracy = quantile_accuracy
        self.quantile_buckets = quantile_buckets
        self.patterns = tuple(patterns)
        self.min_max = bool(min_max)
        self.every_n_steps = every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.log_min_max = bool(log_min_max)
        self.histograms = bool(histograms)
        self.channels = channels
        self.accumulator_dtype = accumulator_dtype
        self.prefix = prefix
        if mask_fn is not None and not callable(mask_fn):
            raise ValueError(
                f"ActivationStats: `mask_fn` must be a callable batch -> bool mask, got "
                f"{type(mask_fn).__name__}"
            )
        self.mask_fn = mask_fn
        self._mask: Tensor | None = None  # the running batch's padding mask, from mask_fn
        self._layers: dict[str, _LayerStats] = {}
        self._handles: list[RemovableHandle] = []
        self._model: weakref.ref[nn.Module] | None = None  # the hooked model: where stats live
        self._recording = False
        self._skipped: set[str] = set()
        self._last: Callable[[], Tensor | None] = _none
        self.last_report: SyncReport | None = None
        self._drift = DriftTracker()
        # Lightning reads state_key around every hook call (profiler names): build it once.
        # Quantiles join the key only when kept: keys of checkpoints without them are unchanged.
        extra = {} if quantiles is None else {"quantiles": list(quantiles)}
        self._state_key = self._generate_state_key(
            patterns=self.patterns, min_max=self.min_max, channels=self.channels, **extra
        )

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(patterns={list(self.patterns)!r}, min_max={self.min_max!r}, "
            f"every_n_steps={self.every_n_steps!r}, log_every_n_steps={self.log_every_n_steps!r}, "
            f"log_min_max={self.log_min_max!r}, channels={self.channels!r}, "
            f"accumulator_dtype={self.accumulator_dtype}, prefix={self.prefix!r}, "
            f"quantiles={self.quantiles!r})"
        )

    @property
    def layer_stats(self) -> dict[str, tuple[RunningMoments, RunningMinMax | None]]:
        return {name: (ls.moments, ls.minmax) for name, ls in self._layers.items()}

    @property
    def layer_quantiles(self) -> dict[str, RunningQuantiles]:
        """``{layer name: quantile sketch}`` of every layer, when ``quantiles`` is set."""
        return {n: ls.quantiles for n, ls in self._layers.items() if ls.quantiles is not None}

    def all_stats(self) -> list[Stat]:
        """Every stat, in a fixed order (by layer name) that is the same on every rank."""
        return [s for name in sorted(self._layers) for s in self._layers[name].stats()]

    # ------------------------------------------------------------------ hooks on the model
    def attach(self, model: nn.Module) -> None:
        """Register forward hooks on the submodules of ``model`` matching ``patterns``."""
        self.detach()
        self._model = weakref.ref(model)
        for name, mod in model.named_modules():
            if name and matches(name, self.patterns):
                self._handles.append(mod.register_forward_hook(self._make_hook(name)))
        if not self._handles:
            rank_zero_warn(
                f"ActivationStats: no submodule matches {list(self.patterns)}; nothing will be "
                "recorded. Check the patterns against `model.named_modules()`."
            )

    def detach(self) -> None:
        """Remove the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def recording(self) -> _Recording:
        """Context manager: record the hooked layers' outputs inside it (a training step)."""
        return _Recording(self)

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._recording and module.training:
                if isinstance(output, Tensor):
                    self._record(name, module, output)
                elif name not in self._skipped:
                    self._skipped.add(name)
                    rank_zero_warn(
                        f"ActivationStats: layer {name!r} returns a {type(output).__name__}, "
                        "not a tensor; it is not recorded. Hook the submodule that produces the "
                        "tensor, or exclude the layer with `patterns` to silence this warning."
                    )

        return hook

    def _record(self, name: str, module: nn.Module, output: Tensor) -> None:
        # A container returning its last child's output (a Sequential) is not recorded twice;
        # weakly referenced: holding outputs longer than autograd does costs memory.
        if self._last() is output:
            return
        if not output.is_floating_point() or output.dim() == 0 or name in self._skipped:
            return
        self._last = weakref.ref(output)
        layer = self._layers.get(name)
        if layer is None:
            layer = self._create(name, module, output)
        if layer.moments.count.device != output.device:  # the model moved after a restore
            layer.to(output.device)
        x = output.detach()
        if layer.feature_dim == 1 and x.dim() >= 3:
            x = x.movedim(1, -1)
        n_features = layer.moments.n_features
        if x.shape[-1] != n_features:
            self._skipped.add(name)
            rank_zero_warn(
                f"ActivationStats: layer {name!r} produced an output of shape {tuple(output.shape)}"
                f" whose feature axis no longer has {n_features} features; it is no longer "
                "recorded. Exclude it with `patterns` to silence this warning."
            )
            return
        if x.dtype not in _FAST_DTYPES:
            x = x.float()  # bf16/fp16 activations: the stats' fast path is float32
        mask = self._mask
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            mask = mask.to(x.device).reshape(-1)
        else:
            mask = None  # no mask, or an output whose rows are not the mask's (pooled)
        x = x.reshape(-1, n_features)  # one copy at most, shared by both stats
        layer.moments.update(x, mask=mask)
        if layer.minmax is not None:
            layer.minmax.update(x, mask=mask)
        if layer.quantiles is not None:
            layer.quantiles.update(x, mask=mask)

    def _feature_dim(self, module: nn.Module, output: Tensor) -> int:
        if self.channels == "last" or output.dim() < 3:
            return -1
        if output.dim() >= 4 or isinstance(module, _CHANNEL_FIRST_TYPES):
            return 1
        return -1

    def _create(self, name: str, module: nn.Module, output: Tensor) -> _LayerStats:
        fdim = self._feature_dim(module, output)
        layer = self._new_layer(name, fdim, int(output.shape[fdim]), output.device)
        self._layers[name] = layer
        return layer

    def _new_layer(
        self, name: str, feature_dim: int, n_features: int, device: torch.device | str
    ) -> _LayerStats:
        # nan_policy="propagate": "raise" would read a value on the host at every update.
        options: dict[str, Any] = {
            "accumulator_dtype": self.accumulator_dtype, "nan_policy": "propagate", "device": device
        }
        moments = RunningMoments(n_features, **options)
        moments.stat_name = f"{name} (activations)"
        minmax = None
        if self.min_max:
            minmax = RunningMinMax(n_features, **options)
            minmax.stat_name = f"{name} (activation min/max)"
        quantiles = None
        if self.quantiles is not None:
            quantiles = RunningQuantiles(
                n_features, relative_accuracy=self.quantile_accuracy,
                max_buckets=self.quantile_buckets, **options,
            )
            quantiles.stat_name = f"{name} (activation quantiles)"
        return _LayerStats(feature_dim, moments, minmax, quantiles)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.attach(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()
        self._recording = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint restored before the strategy setup (DDP) was loaded while the model was
        # still on the CPU: follow it to its device.
        self._to_model_device()

    def _model_device(self) -> torch.device:
        """The device of the hooked model (its first parameter or buffer), else the CPU."""
        model = None if self._model is None else self._model()
        if model is not None:
            for t in itertools.chain(model.parameters(), model.buffers()):
                return t.device
        return torch.device("cpu")

    def _to_model_device(self) -> None:
        device = self._model_device()
        for layer in self._layers.values():
            layer.to(device)

    def _padding_mask(self, batch: Any) -> Tensor | None:
        if self.mask_fn is None:
            return None
        mask = self.mask_fn(batch)
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype is not torch.bool):
            raise ValueError(
                f"ActivationStats: `mask_fn` must return a bool tensor (True = real data) or "
                f"None, got {type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}"
            )
        return mask

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Sampling by optimizer step: every batch of a sampled step (gradient accumulation) is
        # recorded, and a resumed run samples the same steps.
        self._recording = trainer.global_step % self.every_n_steps == 0
        self._last = _none
        self._mask = self._padding_mask(batch) if self._recording else None

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._recording = False
        self._last = _none
        self._mask = None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @property
    def _sync_every_n(self) -> int | None:
        return self.log_every_n_steps  # every log reads global values: sync first

    def _sync_at(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: SyncPoint
    ) -> None:
        self.sync(trainer)
        if point.periodic or point.event == "train_epoch_end":
            self._log(trainer, epoch_end=point.event == "train_epoch_end")

    def sync(self, trainer: pl.Trainer | None = None) -> SyncReport:
        """Merge the stats across ranks (every rank must call this together), over the
        trainer's process group (the default group without a trainer)."""
        group = process_group(trainer) if trainer is not None else None
        stats = self.all_stats()
        if dist.is_available() and dist.is_initialized():
            device = group_device(group)  # the callback owns these stats: move, never refuse
            for s in stats:
                if s.count.device != device:
                    s.to(device)
        report = sync_stats(stats, group=group)
        self.last_report = report
        log.debug(
            "ActivationStats: synced %d stats with %d collectives (%d bytes, %.2f ms)",
            report.n_stats,
            report.n_collectives,
            report.n_bytes,
            report.seconds * 1e3,
        )
        return report

    def summary(self) -> LogBatch:
        """Per layer: count, skipped rows, mean over features of the mean and std, the drift of
        the mean since the previous log, and (``log_min_max``) the min and max over features."""
        batch = LogBatch()
        for name in sorted(self._layers):
            layer = self._layers[name]
            key = f"{self.prefix}/{name}"
            readout(batch, key, layer.moments, self._drift)
            if layer.minmax is not None and self.log_min_max:
                # The count is the moments' (both see the same rows): only the range is added.
                batch.scalars[f"{key}/min"] = layer.minmax.min.min()
                batch.scalars[f"{key}/max"] = layer.minmax.max.max()
                batch.vectors[f"{key}/min"] = layer.minmax.min
                batch.vectors[f"{key}/max"] = layer.minmax.max
            if layer.quantiles is not None and self.quantiles is not None:
                quantile_readout(batch, key, layer.quantiles, self.quantiles)
        return batch

    def _log(self, trainer: pl.Trainer, *, epoch_end: bool = False) -> None:
        if self._layers:
            emit(trainer, self.summary(), histograms=self.histograms, epoch_end=epoch_end)

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        layers = []
        for name, layer in self._layers.items():  # creation order
            layers.append(
                {
                    "name": name,
                    "feature_dim": layer.feature_dim,
                    "n_features": int(layer.moments.shape[0]),
                    "moments": _tensors(layer.moments),
                    "minmax": None if layer.minmax is None else _tensors(layer.minmax),
                    # Each stat's own `_version`: its migration reads it on load, as in a model.
                    "versions": {"moments": type(layer.moments)._version}
                    | ({} if layer.minmax is None else {"minmax": type(layer.minmax)._version})
                    | ({} if layer.quantiles is None
                       else {"quantiles": type(layer.quantiles)._version}),
                }
                # Only when kept: checkpoints without quantiles keep their layout.
                | ({} if layer.quantiles is None else {"quantiles": _tensors(layer.quantiles)})
            )
        return {
            "accumulator_dtype": dtype_name(self.accumulator_dtype),
            "layers": layers,
            "drift": self._drift.state_dict(),  # so drift is logged right after a resume
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        layers = state_dict.get("layers")
        if not isinstance(layers, list):
            rank_zero_warn(
                "ActivationStats: the checkpoint's state for this callback has no `layers` list; "
                "activation stats start empty."
            )
            return
        self._layers = {}
        self._skipped = set()
        try:
            self._drift.load_state_dict(state_dict["drift"])
        except (KeyError, TypeError, ValueError, AttributeError):
            self._drift.reset()  # an older checkpoint: drifts again from the second log
        for entry in layers:
            layer = self._new_layer(
                entry["name"], int(entry["feature_dim"]), int(entry["n_features"]), "cpu"
            )
            versions = entry.get("versions", {})
            _load(layer.moments, entry["moments"], versions.get("moments"))
            for part, stat, what in (("minmax", layer.minmax, "min/max"),
                                     ("quantiles", layer.quantiles, "quantiles")):
                if stat is None:
                    continue
                if entry.get(part) is not None:
                    _load(stat, entry[part], versions.get(part))
                else:
                    rank_zero_warn(
                        f"ActivationStats: the checkpoint has no {what} for layer "
                        f"{entry['name']!r}; they start empty."
                    )
            self._layers[entry["name"]] = layer
        # FSDP, DeepSpeed and ModelParallel restore after on_fit_start, with the model already
        # on its device: the stats go there too, or the first activation meets CPU buffers.
        self._to_model_device()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            rank_zero_warn(
                f"ActivationStats: the checkpoint holds no state for {self.state_key}; activation "
                "stats start empty. This is expected when the callback was added after the "
                "checkpoint was written."
            )


def _none() -> None:
    return None


def _tensors(stat: Stat) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in stat.state_dict().items()}


def _load(stat: Stat, tensors: dict[str, Tensor], version: int | None) -> None:
    """Load a saved stat with the version it was saved at, as torch's metadata carries it in a
    model's state dict; older checkpoints have none (the stat loads an unversioned dict)."""
    state: Any = OrderedDict(tensors)  # torch reads the version from its `_metadata`
    if version is not None:
        state._metadata = {"": {"version": int(version)}}
    stat.load_state_dict(state)


class _Recording:
    def __init__(self, cb: ActivationStats) -> None:
        self.cb = cb

    def __enter__(self) -> None:
        self.cb._recording = True

    def __exit__(self, *exc: object) -> None:
        self.cb._recording = False
        self.cb._last = _none
