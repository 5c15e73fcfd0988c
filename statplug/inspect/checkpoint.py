"""Read a checkpoint file alone and describe its stats, masks, encodings and other buffers.

Used by ``statplug inspect`` and ``statplug plot``. Nothing of the model is imported or built:
the file is loaded with ``torch.load(weights_only=True)`` and its tensors are recognised by their
``state_dict`` key layout, which is statplug's public contract. The tensors under one prefix are
a stat when a stat class reads them back as its own state (:meth:`Stat.summarize_state`: the
class's keys, checks and read-outs, repeated nowhere here); a bool ``mask`` is a mask
(``RandomMask`` with a ``seed``), and a bool ``<name>_mask`` a pruning mask.

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
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from statplug._buffers import dtype_name
from statplug.errors import ConfigError
from statplug.stats import EMAMoments, RunningMinMax, RunningMoments, RunningQuantiles
from statplug.stats.base import Stat, StateSummary

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "MAX_DEPTH",
    "CheckpointSummary",
    "Entry",
    "format_config",
    "json_safe",
    "load_checkpoint",
    "printable",
    "summarize",
    "summarize_file",
]

# File suffixes taken for checkpoints (``statplug plot FOLDER``; ``statplug fit run.ckpt`` re-runs
# the config stored in one).
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
_KNOWN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# The stat classes whose saved state is recognised, in the order they are tried: a sketch's
# state holds a min/max state's keys too, so the sketch goes first.
_STAT_CLASSES: tuple[type[Stat], ...] = (
    RunningQuantiles, EMAMoments, RunningMoments, RunningMinMax
)


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


# torch.save writes a zip archive (since torch 1.6); older files start with this pickled number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
# A checkpoint's containers nest a few levels (checkpoint -> callbacks -> state -> layers -> stat):
# deeper, or more visits than bytes, means references built to make readers loop or blow up.
MAX_DEPTH = 64
# Tied weights make two tensors share one storage; more tensor bytes than this many times the file
# size means views multiplied to make readers do unbounded work.
_MAX_TENSOR_BYTES_PER_FILE_BYTE = 4


def _describe_head(head: bytes) -> str:
    """What a file that is not a torch checkpoint looks like, from its first bytes."""
    if not head:
        return "the file is empty"
    for cut in range(4):  # the head may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if "\x00" not in text:
            return "it is a text file"
        break
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _check_container(p: Path, shown: str) -> None:
    """Refuse what is not a torch checkpoint, and archives built to expand, before torch reads."""
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(512)
    if head.startswith(_LEGACY_MAGIC):
        return  # torch < 1.6 format: torch checks each storage's size against the file
    if not head.startswith(_ZIP_MAGIC):
        raise ConfigError(
            f"`{shown}` is not a torch checkpoint: {_describe_head(head)} (torch.save and "
            "Lightning write a zip archive)"
        )
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise ConfigError(
            f"`{shown}` is not a torch checkpoint: a damaged zip archive ({_first(err)})"
        ) from None
    if not any(i.filename.rpartition("/")[2] == "data.pkl" for i in infos):
        raise ConfigError(
            f"`{shown}` is not a torch checkpoint: a zip archive without torch's data.pkl record"
        )
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise ConfigError(
            f"`{shown}` is not a torch checkpoint: it holds compressed records, which torch.save "
            "never writes (refusing to expand them)"
        )
    claimed = sum(i.file_size for i in infos)
    if claimed > size:
        raise ConfigError(
            f"`{shown}` is not a torch checkpoint: its records claim {claimed:,} bytes, more than "
            f"the file's {size:,} (records that overlap, built to expand)"
        )


def _first(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _load_error(shown: str, err: BaseException) -> ConfigError:
    """The one-line reason torch could not load a file that looked like a checkpoint."""
    text = str(err)
    refused = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", text) or (
        re.search(r"unrecognized function (\S+)|new object for .* but got (\S+)", text)
    )
    if isinstance(err, pickle.UnpicklingError) and refused:
        name = next(g for g in refused.groups() if g)
        return ConfigError(
            f"`{shown}` holds pickled Python objects (`{name}`) that weights_only loading refuses; "
            "if you trust the file, pass --trust to load it with weights_only=False"
        )
    if isinstance(err, MemoryError):
        return ConfigError(f"`{shown}` is too large to load into memory")
    reason = _first(err)
    if isinstance(err, pickle.UnpicklingError):
        # torch prefixes the unpickler's reason with advice on weights_only; keep the reason.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        inner = [ln for ln in lines if "WeightsUnpickler error" in ln or "Unsupported" in ln]
        reason = inner[-1].split("error:", 1)[-1].strip() if inner else lines[-1] if lines else ""
    return ConfigError(f"`{shown}` is a damaged torch checkpoint: {reason or type(err).__name__}")


def _key_text(key: Any) -> str:
    """A container key as a name: printable, never a tensor's full repr."""
    if isinstance(key, str | int | float | bool) or key is None:
        return printable(str(key))
    return f"<{type(key).__name__}>"


def _short(where: str, limit: int = 120) -> str:
    return where if len(where) <= limit else where[: limit - 3] + "..."


def _check_tree(ckpt: Any, shown: str, file_size: int) -> None:
    """Bound the loaded structure: depth, container visits, tensor layouts and total tensor bytes.

    A weights_only pickle may still share one container many times over (exponential size when
    walked), nest containers in cycles, or give many tensors views of one storage (or zero strides)
    so that a small file claims terabytes. Readers below walk the structure freely after this.
    """
    budget = 2 * file_size + 10_000  # a pickle spends at least one byte per container entry
    tensor_budget = _MAX_TENSOR_BYTES_PER_FILE_BYTE * file_size + (1 << 20)
    tensor_bytes = 0
    stack: list[tuple[Any, int, str]] = [(ckpt, 0, "")]
    while stack:
        node, depth, where = stack.pop()
        budget -= 1
        if budget < 0 or depth > MAX_DEPTH:
            what = "nests containers too deeply" if depth > MAX_DEPTH else "repeats containers"
            raise ConfigError(
                f"`{shown}` {what} (at `{_short(where) or '<top>'}`): shared or cyclic references "
                "built to make readers loop; not a checkpoint statplug reads"
            )
        if isinstance(node, Tensor):
            tensor_bytes += _checked_tensor_bytes(node, where, shown)
            if tensor_bytes > tensor_budget:
                raise ConfigError(
                    f"`{shown}`: its tensors claim more than {tensor_budget:,} bytes from a "
                    f"{file_size:,}-byte file (views of one storage repeated, built to expand)"
                )
        elif isinstance(node, Mapping):
            stack.extend(
                (v, depth + 1, f"{where}.{_key_text(k)}" if where else _key_text(k))
                for k, v in node.items()
            )
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend(
                (v, depth + 1, f"{where}.{i}" if where else str(i)) for i, v in enumerate(node)
            )


def _checked_tensor_bytes(t: Tensor, where: str, shown: str) -> int:
    """The bytes ``t`` spans; refuses tensors that claim more elements than their storage."""
    if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
        raise ConfigError(
            f"`{shown}`: `{_short(where)}` is a {t.layout}/{t.device.type} tensor; statplug reads "
            "dense CPU tensors only"
        )
    claimed = t.numel() * t.element_size()
    held = t.untyped_storage().nbytes()
    if claimed > held:
        raise ConfigError(
            f"`{shown}`: tensor `{_short(where)}` claims {t.numel():,} elements of shape "
            f"{list(t.shape)} but its storage holds {held:,} bytes (a crafted or expanded view)"
        )
    return claimed


def printable(text: str) -> str:
    """``text`` with control characters escaped, so names read from a file cannot drive the
    terminal (escape sequences) or break a one-line message."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def load_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """``torch.load`` a checkpoint on the CPU, ``weights_only`` unless ``trust``.

    Before torch reads the file it must look like one torch.save writes (a zip archive of stored,
    non-overlapping records, or torch's legacy format); after, its structure must be bounded (see
    ``MAX_DEPTH``) and its tensors must not claim more bytes than their storage holds.

    Raises:
        ConfigError: missing file, not a torch checkpoint (text, random bytes, another archive),
            a damaged or crafted checkpoint, or pickled objects (with the ``--trust`` fix).
    """
    p = Path(path)
    shown = printable(str(path))
    if not p.is_file():
        if p.exists():
            raise ConfigError(f"`{shown}` is not a file (expected a checkpoint file)")
        raise ConfigError(f"checkpoint file not found: `{shown}`")
    try:
        _check_container(p, shown)
        ckpt = torch.load(p, map_location="cpu", weights_only=not trust)
    except ConfigError:
        raise
    except OSError as err:
        raise ConfigError(f"cannot read `{shown}`: {err.strerror or _first(err)}") from None
    except Exception as err:  # arbitrary bytes make the unpickler fail in many ways
        raise _load_error(shown, err) from None
    if not isinstance(ckpt, dict):
        raise ConfigError(
            f"`{shown}` is not a checkpoint dict (got {type(ckpt).__name__}); expected a "
            "Lightning checkpoint or a state_dict"
        )
    _check_tree(ckpt, shown, p.stat().st_size)
    return ckpt


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(dotted key, tensor)`` for every tensor in nested dicts and lists."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            key = _key_text(k)
            yield from _flatten(v, f"{prefix}.{key}" if prefix else key)
    elif isinstance(obj, list | tuple):
        # Named items (ActivationStats' ``layers``: ``[{"name": "features.conv1", ...}]``) are
        # keyed by their name instead of the list's key and index.
        parent = prefix.rpartition(".")[0]
        for i, v in enumerate(obj):
            name = v.get("name") if isinstance(v, Mapping) else None
            if isinstance(name, str) and name:
                name = printable(name)
                yield from _flatten(v, f"{parent}.{name}" if parent else name)
            else:
                yield from _flatten(v, f"{prefix}.{i}" if prefix else str(i))


def _f(x: Tensor) -> float:
    v = float(x)
    return v if math.isfinite(v) else (math.inf if v > 0 else -math.inf if v < 0 else math.nan)


def _round(v: float) -> float | str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(f"{v:.6g}")


def _read_stat(leaves: dict[str, Tensor]) -> StateSummary | None:
    """The first stat class that reads ``leaves`` back as its own state, summarised.

    Tensors with a stat's key names but not its shapes, dtypes or valid values are someone
    else's module (or a damaged file): they are listed as plain buffers, never summarised as a
    stat they are not.
    """
    for cls in _STAT_CLASSES:
        summary = cls.summarize_state(leaves)
        if summary is not None:
            return summary
    return None


def _stat_entry(name: str, source: str, s: StateSummary) -> Entry:
    f = s.features
    summary: dict[str, Any] = {}
    if s.count and "mean" in f:
        mean = f["mean"]
        summary = {
            "mean": _round(_f(mean.mean())),
            "std": _round(_f(f["std"].mean())),
            "min_mean": _round(_f(mean.min())),
            "max_mean": _round(_f(mean.max())),
        }
    elif s.count and "q50" in f:  # the lowest q01, the median q50, the highest q99
        summary = {
            "q01": _round(_f(f["q01"].min())),
            "q50": _round(_f(f["q50"].median())),
            "q99": _round(_f(f["q99"].max())),
        }
    elif s.count and "min" in f:
        summary = {"min": _round(_f(f["min"].min())), "max": _round(_f(f["max"].max()))}
    summary.update((k, _round(v)) for k, v in s.scalars.items())
    if s.n_skipped:
        summary["skipped"] = s.n_skipped
    if s.frozen:
        summary["frozen"] = True
    return Entry(
        name=name,
        kind=s.kind,
        group="stat",
        source=source,
        shape=list(s.shape),
        dtype=dtype_name(s.dtype),
        count=s.count,
        summary=summary,
        arrays={k: v.tolist() for k, v in f.items()},
    )


def _mask_entry(name: str, kind: str, source: str, mask: Tensor) -> Entry:
    density = float(mask.float().mean()) if mask.numel() else 1.0
    return Entry(
        name=name,
        kind=kind,
        group="mask",
        source=source,
        shape=list(mask.shape),
        dtype=dtype_name(mask.dtype),
        summary={"kept": _round(density), "pruned": int((~mask).sum())}
        if kind == "pruning mask"
        else {"kept": _round(density)},
    )


def _buffer_entry(name: str, source: str, t: Tensor) -> Entry:
    summary: dict[str, Any] = {}
    if t.is_complex() or t.numel() == 0:
        pass  # nothing a one-line summary says well
    elif t.numel() == 1:
        summary = {"value": _round(_f(t)) if t.is_floating_point() else t.item()}
    elif t.dtype != torch.bool:
        d = t.double()
        summary = {
            "mean": _round(_f(d.mean())),
            "min": _round(_f(d.min())),
            "max": _round(_f(d.max())),
        }
    else:
        summary = {"true": _round(float(t.float().mean()))}
    return Entry(
        name, "buffer", "buffer", source, list(t.shape), dtype_name(t.dtype), summary=summary
    )


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
        stat = _read_stat(leaves)
        if stat is not None:
            entries.append(_stat_entry(name_prefix + (prefix or stat.kind), source, stat))
            claimed.update(full(prefix, leaf) for leaf in stat.keys)
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
            label = _callback_label(_key_text(state_key))
            cb_tensors = dict(_flatten(cb_state))
            cb_entries, _ = _walk(cb_tensors, f"callback {label}", f"{label}:")
            # A callback's other tensors are its bookkeeping (ModelCheckpoint's best score), not
            # buffers of the model: only its stats and masks are listed.
            entries.extend(e for e in cb_entries if e.group != "buffer")
    meta = ckpt.get("statplug")
    summary = CheckpointSummary(
        path=path,
        entries=entries,
        epoch=_int_or_none(ckpt.get("epoch")),
        global_step=_int_or_none(ckpt.get("global_step")),
        n_parameters=len(params),
        n_parameter_values=sum(t.numel() for t in params.values()),
    )
    if isinstance(meta, Mapping):
        summary.metadata_version = _int_or_none(meta.get("version"))
        cfg = meta.get("config")
        summary.has_config = isinstance(cfg, Mapping)
        if isinstance(cfg, Mapping):
            summary.config = dict(cfg)
            source = meta.get("config_source")
            summary.config_source = printable(source) if isinstance(source, str) else "recipe"
        if isinstance(cfg, Mapping) and isinstance(cfg.get("description"), str):
            summary.recipe_description = printable(cfg["description"])
        _apply_metadata(summary, meta)
    return summary


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _meta_items(meta: Mapping[str, Any], group: str) -> list[Mapping[str, Any]]:
    """The well-formed entries of ``meta[group]``; the metadata is optional, so a malformed part
    is skipped (the state_dict alone already gave the table)."""
    items = meta.get(group)
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def _meta_shape(value: Any) -> list[int]:
    if isinstance(value, list) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value
    ):
        return list(value)
    return []


def _apply_metadata(summary: CheckpointSummary, meta: Mapping[str, Any]) -> None:
    """Add what only the metadata knows: accumulator dtypes, derived masks and encodings."""
    model_entries = {e.name: e for e in summary.entries if e.source == "model"}
    for item in _meta_items(meta, "stats"):
        entry = model_entries.get(_key_text(item.get("name")))
        if entry is not None and isinstance(item.get("kind"), str) and item["kind"]:
            entry.kind = printable(item["kind"])
    for group in ("masks", "encodings"):
        for item in _meta_items(meta, group):
            name = _key_text(item.get("name", "?"))
            kind = printable(item["kind"]) if isinstance(item.get("kind"), str) else "?"
            existing = model_entries.get(name)
            if existing is not None:
                existing.kind = kind if kind != "?" else existing.kind
                continue
            if item.get("persistent"):
                continue  # saved state is listed from the state_dict under its own keys
            summary.entries.append(
                Entry(
                    name=name,
                    kind=kind,
                    group="mask" if group == "masks" else "encoding",
                    source="model",
                    shape=_meta_shape(item.get("shape")),
                    dtype="-",
                    summary={"saved": False, "note": "derived, rebuilt on load"},
                )
            )


def summarize_file(path: str | Path, *, trust: bool = False) -> CheckpointSummary:
    """Load ``path`` and :func:`summarize` it.

    Raises:
        ConfigError: see :func:`load_checkpoint`; also a file whose tensors cannot be read.
    """
    ckpt = load_checkpoint(path, trust=trust)
    shown = printable(str(path))
    try:
        return summarize(ckpt, shown)
    except (RuntimeError, ValueError, TypeError, IndexError, OverflowError) as err:
        # Last resort for a crafted file the checks above did not foresee: the command promises
        # a table or one line, never a traceback.
        raise ConfigError(
            f"`{shown}`: cannot read its tensors ({type(err).__name__}: {_first(err)}); the "
            "checkpoint is damaged or was not written by torch.save"
        ) from None


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


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON can hold it: a stored config read from any file may carry
    tensors, non-finite floats or non-text keys (shown as text, like the table's summaries)."""
    if isinstance(value, Mapping):
        return {_key_text(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else _round(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, Tensor):
        return f"<tensor {list(value.shape)} {dtype_name(value.dtype)}>"
    return f"<{type(value).__name__}>"


def format_config(summary: CheckpointSummary) -> str:
    """The stored config as YAML (``statplug inspect --config``)."""
    import yaml

    if summary.config is None:
        return "no config stored in this checkpoint"
    head = f"# config stored by {summary.config_source or 'recipe'}"
    # json_safe: a crafted file's tensors or odd keys become text; YAML escapes control characters.
    body = yaml.safe_dump(json_safe(summary.config), sort_keys=False, default_flow_style=False)
    return f"{head}\n{body.rstrip()}"
