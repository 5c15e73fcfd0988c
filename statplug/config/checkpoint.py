"""Read a checkpoint file alone and describe its stats, masks, encodings and other buffers.

Used by ``statplug inspect`` and ``statplug plot``. Nothing of the model is imported or built:
the file is loaded with ``torch.load(weights_only=True)`` and its tensors are recognised by their
``state_dict`` key layout, which is statplug's public contract:

=============================================  ==========================================
keys under one prefix                           recognised as
=============================================  ==========================================
``count``, ``mean``, ``m2``                    ``RunningMoments`` (inside a ``RunningNorm``
                                               its prefix ends in ``.moments``)
``count``, ``min``, ``max``                    ``RunningMinMax``
``count``, ``weight``, ``mean``, ``var``       ``EMAMoments``
``mask`` (bool), with ``seed``                 ``RandomMask`` (without: a mask)
``<name>_mask`` (bool)                         a pruning mask
=============================================  ==========================================

Other integer, bool and well-known buffers (``running_mean``, ``num_batches_tracked``) are listed
as buffers; floating tensors that match nothing are taken for parameters and only counted. The
callbacks' states (``checkpoint["callbacks"]``, where ``ActivationStats`` keeps its stats) are
walked the same way. ``checkpoint["statplug"]``, written by ``StatsMixin``, adds what the
``state_dict`` cannot tell (non-persistent masks and encodings, accumulator dtypes, frozen-ness)
but is not needed.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from statplug.config.errors import ConfigError

__all__ = [
    "CheckpointSummary",
    "Entry",
    "format_config",
    "load_checkpoint",
    "summarize",
    "summarize_file",
]

_KNOWN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_STAT_LAYOUTS: tuple[tuple[str, frozenset[str]], ...] = (
    ("EMAMoments", frozenset({"count", "weight", "mean", "var"})),
    ("RunningMoments", frozenset({"count", "mean", "m2"})),
    ("RunningMinMax", frozenset({"count", "min", "max"})),
)
_STAT_EXTRA = frozenset({"n_skipped", "frozen_flag"})


@dataclass
class Entry:
    """One stat, mask, encoding or buffer found in a checkpoint."""

    name: str
    kind: str
    group: str  # "stat", "mask", "encoding" or "buffer"
    source: str  # "model" or "callback <state key>"
    shape: list[int]
    dtype: str
    count: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    # Per-feature values for plotting (flattened), not part of the JSON summary.
    arrays: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("arrays")
        return out


@dataclass
class CheckpointSummary:
    """What ``statplug inspect`` shows."""

    path: str
    entries: list[Entry]
    epoch: int | None = None
    global_step: int | None = None
    metadata_version: int | None = None
    has_config: bool = False
    config_source: str | None = None  # "recipe" or "LightningCLI" (StatsMixin's metadata)
    config: dict[str, Any] | None = field(default=None, repr=False)
    recipe_description: str | None = None
    n_parameters: int = 0
    n_parameter_values: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.path,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "statplug_metadata_version": self.metadata_version,
            "has_config": self.has_config,
            "config_source": self.config_source,
            "parameters": {"tensors": self.n_parameters, "values": self.n_parameter_values},
            "entries": [e.to_json() for e in self.entries],
        }


def load_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """``torch.load`` a checkpoint on the CPU, ``weights_only`` unless ``trust``.

    Raises:
        ConfigError: missing file, not a torch checkpoint, or pickled objects (with the fix).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"checkpoint file not found: `{path}`")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling failed"
        raise ConfigError(
            f"`{path}` holds objects that weights_only loading refuses ({first}); if you trust "
            "the file, pass --trust to load it with weights_only=False"
        ) from None
    except Exception as err:  # arbitrary bytes make the unpickler fail in many ways
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"`{path}` is not a readable torch checkpoint: {first}") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(
            f"`{path}` is not a checkpoint dict (got {type(ckpt).__name__}); expected a "
            "Lightning checkpoint or a state_dict"
        )
    return ckpt


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(dotted key, tensor)`` for every tensor in nested dicts and lists."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        # Named items (ActivationStats' ``layers``: ``[{"name": "features.conv1", ...}]``) are
        # keyed by their name instead of the list's key and index.
        parent = prefix.rpartition(".")[0]
        for i, v in enumerate(obj):
            name = v.get("name") if isinstance(v, Mapping) else None
            if isinstance(name, str) and name:
                yield from _flatten(v, f"{parent}.{name}" if parent else name)
            else:
                yield from _flatten(v, f"{prefix}.{i}" if prefix else str(i))


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _f(x: Tensor) -> float:
    v = float(x)
    return v if math.isfinite(v) else (math.inf if v > 0 else -math.inf if v < 0 else math.nan)


def _round(v: float) -> float | str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(f"{v:.6g}")


def _stat_entry(kind: str, name: str, source: str, leaves: dict[str, Tensor]) -> Entry:
    count = int(leaves["count"])
    summary: dict[str, Any] = {}
    arrays: dict[str, list[float]] = {}
    value_key = {"RunningMoments": "mean", "EMAMoments": "mean", "RunningMinMax": "min"}[kind]
    ref = leaves[value_key]
    if kind in ("RunningMoments", "EMAMoments"):
        mean = leaves["mean"].double()
        var = leaves["m2"].double() / max(count, 1) if kind == "RunningMoments" else leaves["var"]
        std = var.double().clamp(min=0).sqrt()
        if count:
            summary = {
                "mean": _round(_f(mean.mean())),
                "std": _round(_f(std.mean())),
                "min_mean": _round(_f(mean.min())),
                "max_mean": _round(_f(mean.max())),
            }
        arrays = {"mean": mean.reshape(-1).tolist(), "std": std.reshape(-1).tolist()}
        if kind == "EMAMoments":
            summary["weight"] = _round(_f(leaves["weight"]))
    else:
        lo, hi = leaves["min"].double(), leaves["max"].double()
        if count:
            summary = {"min": _round(_f(lo.min())), "max": _round(_f(hi.max()))}
        arrays = {"min": lo.reshape(-1).tolist(), "max": hi.reshape(-1).tolist()}
    if "n_skipped" in leaves and int(leaves["n_skipped"]):
        summary["skipped"] = int(leaves["n_skipped"])
    if "frozen_flag" in leaves and bool(leaves["frozen_flag"]):
        summary["frozen"] = True
    return Entry(
        name=name,
        kind=kind,
        group="stat",
        source=source,
        shape=list(ref.shape),
        dtype=_dtype(ref),
        count=count,
        summary=summary,
        arrays=arrays,
    )


def _mask_entry(name: str, kind: str, source: str, mask: Tensor) -> Entry:
    density = float(mask.float().mean()) if mask.numel() else 1.0
    return Entry(
        name=name,
        kind=kind,
        group="mask",
        source=source,
        shape=list(mask.shape),
        dtype=_dtype(mask),
        summary={"kept": _round(density), "pruned": int((~mask).sum())}
        if kind == "pruning mask"
        else {"kept": _round(density)},
    )


def _buffer_entry(name: str, source: str, t: Tensor) -> Entry:
    summary: dict[str, Any] = {}
    if t.numel() == 1:
        summary = {"value": t.item() if not t.is_floating_point() else _round(_f(t))}
    elif t.numel() and (t.is_floating_point() or t.dtype != torch.bool):
        d = t.double()
        summary = {
            "mean": _round(_f(d.mean())),
            "min": _round(_f(d.min())),
            "max": _round(_f(d.max())),
        }
    elif t.numel():
        summary = {"true": _round(float(t.float().mean()))}
    return Entry(name, "buffer", "buffer", source, list(t.shape), _dtype(t), summary=summary)


def _walk(
    tensors: dict[str, Tensor], source: str, name_prefix: str = ""
) -> tuple[list[Entry], dict[str, Tensor]]:
    """Recognise stats, masks and buffers in a flat ``{key: tensor}``; return the rest too."""
    by_prefix: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        by_prefix.setdefault(prefix, {})[leaf] = t
    entries: list[Entry] = []
    claimed: set[str] = set()

    def full(prefix: str, leaf: str) -> str:
        return f"{prefix}.{leaf}" if prefix else leaf

    for prefix, leaves in by_prefix.items():
        names = set(leaves)
        for kind, layout in _STAT_LAYOUTS:
            if layout <= names and not leaves["count"].is_floating_point():
                entries.append(_stat_entry(kind, name_prefix + (prefix or kind), source, leaves))
                claimed.update(full(prefix, leaf) for leaf in layout | (_STAT_EXTRA & names))
                break
        else:
            mask = leaves.get("mask")
            if mask is not None and mask.dtype == torch.bool:
                kind = "RandomMask" if "seed" in names else "mask"
                entries.append(_mask_entry(name_prefix + (prefix or "mask"), kind, source, mask))
                claimed.add(full(prefix, "mask"))
                if "seed" in names:
                    claimed.add(full(prefix, "seed"))
    rest: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key in claimed:
            continue
        leaf = key.rpartition(".")[2]
        if leaf.endswith("_mask") and t.dtype == torch.bool:
            entries.append(_mask_entry(name_prefix + key, "pruning mask", source, t))
        elif leaf in _KNOWN_BUFFERS or not t.is_floating_point():
            entries.append(_buffer_entry(name_prefix + key, source, t))
        else:
            rest[key] = t
    return entries, rest


def _callback_label(state_key: str) -> str:
    """``ActivationStats{'patterns': ...}`` -> ``ActivationStats``."""
    return state_key.split("{", 1)[0] or state_key


def summarize(ckpt: dict[str, Any], path: str = "") -> CheckpointSummary:
    """Describe every stat, mask, encoding and buffer of a loaded checkpoint dict."""
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        # A bare state_dict saved with torch.save(model.state_dict()).
        state = {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    tensors = dict(_flatten(state))
    entries, params = _walk(tensors, "model")
    callbacks = ckpt.get("callbacks")
    if isinstance(callbacks, Mapping):
        for state_key, cb_state in callbacks.items():
            label = _callback_label(str(state_key))
            cb_tensors = dict(_flatten(cb_state))
            cb_entries, _ = _walk(cb_tensors, f"callback {label}", f"{label}:")
            # A callback's other tensors are its bookkeeping (ModelCheckpoint's best score), not
            # buffers of the model: only its stats and masks are listed.
            entries.extend(e for e in cb_entries if e.group != "buffer")
    meta = ckpt.get("statplug")
    summary = CheckpointSummary(
        path=path,
        entries=entries,
        epoch=ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        global_step=ckpt.get("global_step") if isinstance(ckpt.get("global_step"), int) else None,
        n_parameters=len(params),
        n_parameter_values=sum(t.numel() for t in params.values()),
    )
    if isinstance(meta, Mapping):
        summary.metadata_version = meta.get("version")
        cfg = meta.get("config")
        summary.has_config = isinstance(cfg, Mapping)
        if isinstance(cfg, Mapping):
            summary.config = dict(cfg)
            source = meta.get("config_source")
            summary.config_source = source if isinstance(source, str) else "recipe"
        if isinstance(cfg, Mapping) and isinstance(cfg.get("description"), str):
            summary.recipe_description = cfg["description"]
        _apply_metadata(summary, meta)
    return summary


def _apply_metadata(summary: CheckpointSummary, meta: Mapping[str, Any]) -> None:
    """Add what only the metadata knows: accumulator dtypes, derived masks and encodings."""
    model_entries = {e.name: e for e in summary.entries if e.source == "model"}
    for item in meta.get("stats") or []:
        if not isinstance(item, Mapping):
            continue
        entry = model_entries.get(str(item.get("name")))
        if entry is not None and item.get("kind"):
            entry.kind = str(item["kind"])
    for group in ("masks", "encodings"):
        for item in meta.get(group) or []:
            if not isinstance(item, Mapping):
                continue
            name = str(item.get("name", "?"))
            existing = model_entries.get(name)
            if existing is not None:
                existing.kind = str(item.get("kind", existing.kind))
                continue
            if item.get("persistent"):
                continue  # saved state is listed from the state_dict under its own keys
            summary.entries.append(
                Entry(
                    name=name,
                    kind=str(item.get("kind", "?")),
                    group="mask" if group == "masks" else "encoding",
                    source="model",
                    shape=[int(s) for s in item.get("shape") or []],
                    dtype="-",
                    summary={"saved": False, "note": "derived, rebuilt on load"},
                )
            )


def summarize_file(path: str | Path, *, trust: bool = False) -> CheckpointSummary:
    """Load ``path`` and :func:`summarize` it."""
    return summarize(load_checkpoint(path, trust=trust), str(path))


def _fmt_summary(summary: dict[str, Any]) -> str:
    parts = []
    for k, v in summary.items():
        if k == "note":
            parts.append(str(v))
        elif k == "saved":
            continue
        elif isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def format_table(summary: CheckpointSummary) -> str:
    """The ``statplug inspect`` table."""
    head = [f"checkpoint: {summary.path}"]
    if summary.epoch is not None or summary.global_step is not None:
        head.append(f"epoch: {summary.epoch}  global_step: {summary.global_step}")
    meta = (
        f"statplug metadata v{summary.metadata_version}"
        if summary.metadata_version is not None
        else "no statplug metadata (layout read from the state_dict)"
    )
    cfg = (
        f"{summary.config_source or 'recipe'} config stored (--config shows it)"
        if summary.has_config
        else "no recipe config"
    )
    head.append(f"{meta}; {cfg}")
    rows = [("name", "kind", "shape", "dtype", "count", "summary")]
    order = {"stat": 0, "mask": 1, "encoding": 2, "buffer": 3}
    for e in sorted(summary.entries, key=lambda e: (order.get(e.group, 9), e.source != "model")):
        rows.append(
            (
                e.name,
                e.kind,
                "x".join(map(str, e.shape)) if e.shape else ("()" if e.dtype != "-" else "-"),
                e.dtype,
                "-" if e.count is None else f"{e.count:,}",
                _fmt_summary(e.summary),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        cells = [r[j].ljust(widths[j]) if j != 4 else r[j].rjust(widths[j]) for j in range(5)]
        lines.append("  ".join([*cells, r[5]]).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    n_stats = sum(e.group == "stat" for e in summary.entries)
    foot = (
        f"{n_stats} stats, {sum(e.group == 'mask' for e in summary.entries)} masks, "
        f"{sum(e.group == 'encoding' for e in summary.entries)} encodings, "
        f"{sum(e.group == 'buffer' for e in summary.entries)} other buffers; "
        f"{summary.n_parameters} parameter tensors ({summary.n_parameter_values:,} values) not "
        "listed"
    )
    return "\n".join([*head, "", *lines, "", foot])


def format_config(summary: CheckpointSummary) -> str:
    """The stored config as YAML (``statplug inspect --config``)."""
    import yaml

    if summary.config is None:
        return "no config stored in this checkpoint"
    head = f"# config stored by {summary.config_source or 'recipe'}"
    try:
        body = yaml.safe_dump(summary.config, sort_keys=False, default_flow_style=False)
    except yaml.YAMLError:  # a value YAML cannot represent (a tensor in a crafted file)
        body = "\n".join(f"{k}: {v!r}" for k, v in summary.config.items())
    return f"{head}\n{body.rstrip()}"
