"""Check a composed recipe before anything is built: keys against signatures, values against types.

Every node with a ``_target_`` is checked against the signature of what it names (a class's
``__init__`` or a function), ``trainer`` against :class:`lightning.pytorch.Trainer`, and the top
level against the recipe schema. An unknown key is reported with the closest valid key; a value
of an obviously wrong type (text where a number is expected) is reported with the expected type,
a number outside its parameter's declared range (:mod:`statplug.config.ranges`) or not finite
with the range.
Nothing is imported beyond the targets themselves, and nothing is built.
"""

from __future__ import annotations

import collections.abc
import inspect
import logging
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from omegaconf import DictConfig

from statplug.config.errors import ConfigError, closest
from statplug.config.ranges import Range, range_of
from statplug.config.targets import check_literal_text, check_targets, upgrade_targets

__all__ = ["TOP_LEVEL_KEYS", "resolve_target", "validate"]

# The recipe schema: top-level key -> what it holds.
TOP_LEVEL_KEYS: dict[str, str] = {
    "description": "one line shown by `statplug recipes`",
    "seed": "int or null: seeds torch, numpy and random on every rank",
    "num_threads": "int or null: torch intra-op threads per process (null: torch's default)",
    "model": "the LightningModule: a node with `_target_`",
    "data": "the LightningDataModule: a node with `_target_`",
    "trainer": "keyword arguments of lightning.pytorch.Trainer",
    "callbacks": "a mapping name -> callback node with `_target_` (null disables one)",
}
# The top-level nodes that are built (passed to Hydra).
_BUILT_KEYS = ("model", "data", "trainer", "callbacks")
_HYDRA_KEYS = {"_target_", "_args_", "_recursive_", "_convert_", "_partial_"}


def _origin(where: str, overridden: set[str], recipe: Path | None) -> str:
    if where in overridden or any(where.startswith(k + ".") for k in overridden):
        return " (command-line override)"
    return f" (in {recipe})" if recipe is not None else ""


def resolve_target(target: Any, where: str) -> Callable[..., Any]:
    """Import the object a ``_target_`` names, or raise a one-line :class:`ConfigError`."""
    from hydra.utils import get_object

    if not isinstance(target, str) or not target:
        raise ConfigError(f"`{where}._target_` must be a dotted import path, got {target!r}")
    hydra_log = logging.getLogger("hydra.utils")
    was_disabled = hydra_log.disabled
    hydra_log.disabled = True  # it logs the failure on several lines; ours is one
    try:
        obj = get_object(target)
    except Exception as err:  # hydra wraps ImportError/AttributeError in its own exceptions
        module, _, attr = target.rpartition(".")
        hint = ""
        try:
            import importlib

            mod = importlib.import_module(module)
            guess = closest(attr, [n for n in dir(mod) if not n.startswith("_")])
            if guess:
                hint = f"; did you mean `{module}.{guess}`?"
        except Exception:
            pass
        cause = str(err.__cause__ or err).strip().splitlines()
        reason = cause[-1] if cause else type(err).__name__
        raise ConfigError(
            f"`{where}._target_`: cannot import `{target}`{hint} ({reason})"
        ) from None
    finally:
        hydra_log.disabled = was_disabled
    if not callable(obj):
        raise ConfigError(f"`{where}._target_`: `{target}` is not callable")
    return obj  # type: ignore[no-any-return]


def _signature(obj: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, Any]]:
    fn = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)  # keeps Annotated ranges
    except Exception:  # unresolvable forward references: skip type checks
        hints = {}
    return sig, hints


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Annotated:
        return _type_name(get_args(ann)[0])
    if ann is type(None):
        return "null"
    if get_origin(ann) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(ann))
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(ann))
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")


def _type_ok(value: Any, ann: Any) -> bool:
    """Whether a plain YAML ``value`` can be passed where ``ann`` is expected (unknown: True)."""
    if ann is Any or ann is inspect.Parameter.empty or isinstance(ann, typing.TypeVar):
        return True
    if isinstance(value, dict) and "_target_" in value:
        return True  # an object built from the node; its own signature is checked
    origin = get_origin(ann)
    if origin is Annotated:
        return _type_ok(value, get_args(ann)[0])
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(ann))
    if origin is Literal:
        return value in get_args(ann)
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if ann in (Path,) or (isinstance(ann, type) and issubclass(ann, Path)):
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable, set):
        if not isinstance(value, list | tuple):
            return False
        args = [a for a in get_args(ann) if a is not Ellipsis]
        return len(args) != 1 or all(_type_ok(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if isinstance(ann, type):
        if isinstance(value, ann):
            return True
        # A plain value where some other class is expected cannot be right.
        return not isinstance(value, str | int | float | bool | list | dict | type(None))
    return True


def _strip_annotated(ann: Any) -> Any:
    return get_args(ann)[0] if get_origin(ann) is Annotated else ann


def _non_null(ann: Any) -> Any:
    """``X`` from ``X | None`` (the list type of ``list[int] | None``); else ``ann``."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        return args[0] if len(args) == 1 else ann
    return ann


def _check_value(where: str, value: Any, ann: Any, suffix: str) -> None:
    """The value's type, then its range: the parameter's :class:`Range` if it declares one, and
    finite wherever a float arrives (NaN or inf is never a meaningful recipe argument)."""
    if not _type_ok(value, ann):
        raise ConfigError(
            f"bad value for `{where}`: expected {_type_name(ann)}, got "
            f"{'null' if value is None else f'{type(value).__name__} {value!r}'}{suffix}"
        )
    if isinstance(value, list):
        inner = [a for a in get_args(_strip_annotated(_non_null(ann))) if a is not Ellipsis]
        for i, item in enumerate(value):
            _check_value(f"{where}.{i}", item, inner[0] if len(inner) == 1 else Any, suffix)
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    bounds = range_of(ann) or (Range() if isinstance(value, float) else None)
    problem = bounds.problem(value) if bounds is not None else None
    if problem is not None:
        raise ConfigError(f"bad value for `{where}`: {problem}, got {value!r}{suffix}")


def _check_kwargs(
    where: str,
    node: dict[str, Any],
    obj: Callable[..., Any],
    label: str,
    overridden: set[str],
    recipe: Path | None,
    *,
    require: bool = True,
) -> None:
    sig, hints = _signature(obj)
    params = {
        n: p
        for n, p in sig.parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for key, value in node.items():
        if key in _HYDRA_KEYS:
            continue
        full = f"{where}.{key}"
        suffix = _origin(full, overridden, recipe)
        if key not in params:
            if open_kwargs:
                continue
            guess = closest(key, params)
            hint = f"; did you mean `{where}.{guess}`?" if guess else ""
            valid = ", ".join(sorted(params)) or "none"
            detail = f"{label} has no `{key}`" if guess else f"{label} accepts: {valid}"
            raise ConfigError(f"unknown key `{full}`{hint} ({detail}){suffix}")
        _check_value(full, value, hints.get(key, params[key].annotation), suffix)
        if isinstance(value, dict) and "_target_" in value:
            _check_node(full, value, overridden, recipe)
    if require:
        missing = [n for n, p in params.items() if p.default is p.empty and n not in node]
        if missing and "_args_" not in node and not node.get("_partial_", False):
            raise ConfigError(
                f"missing key `{where}.{missing[0]}`: {label} requires it"
                f"{_origin(where, overridden, recipe)}"
            )


def _check_node(where: str, node: Any, overridden: set[str], recipe: Path | None) -> None:
    if not isinstance(node, dict):
        raise ConfigError(
            f"bad value for `{where}`: expected a mapping with `_target_`, got "
            f"{type(node).__name__} {node!r}{_origin(where, overridden, recipe)}"
        )
    if "_target_" not in node:
        guess = closest("_target_", node)
        hint = f" (found `{where}.{guess}`)" if guess else ""
        raise ConfigError(
            f"`{where}` needs a `_target_` naming the class to build{hint}"
            f"{_origin(where, overridden, recipe)}"
        )
    obj = resolve_target(node["_target_"], where)
    label = node["_target_"]
    _check_kwargs(where, node, obj, label, overridden, recipe)


def _trainer_class() -> Callable[..., Any]:
    from lightning.pytorch import Trainer

    return Trainer


def validate(
    cfg: DictConfig,
    *,
    overridden: set[str] | None = None,
    recipe: Path | None = None,
    require: tuple[str, ...] = ("model", "data"),
    trust: bool = False,
) -> dict[str, Any]:
    """Check ``cfg``; return its resolved plain-dict copy.

    Unless ``trust``, every ``_target_`` must be one statplug allows (see
    :mod:`statplug.config.targets`); this is checked before any target is imported.

    Raises:
        ConfigError: the first problem, on one line, naming the key and the closest valid key.
    """
    overridden = overridden or set()
    from statplug.config.loader import to_plain

    plain = upgrade_targets(to_plain(cfg))
    if not trust:
        for key in _BUILT_KEYS:  # what build_node refuses, refused before anything is imported
            check_literal_text(plain.get(key), where=key)
        check_targets(plain, origin=f"the config from `{recipe}`" if recipe is not None else "")
    _check_top_level(plain, overridden, recipe)
    for key in require:
        if plain.get(key) is None:
            raise ConfigError(
                f"missing key `{key}`: a recipe needs `{key}` with a `_target_`"
                f"{_origin(key, overridden, recipe)}"
            )
    for key in ("model", "data"):
        if plain.get(key) is not None:
            _check_node(key, plain[key], overridden, recipe)
    _check_trainer(plain.get("trainer") or {}, overridden, recipe)
    _check_callbacks(plain.get("callbacks") or {}, overridden, recipe)
    return plain


def _check_top_level(plain: dict[str, Any], overridden: set[str], recipe: Path | None) -> None:
    """Top-level keys against the recipe schema, and the values of the plain ones."""
    for key, value in plain.items():
        suffix = _origin(key, overridden, recipe)
        if key not in TOP_LEVEL_KEYS:
            guess = closest(key, TOP_LEVEL_KEYS)
            hint = f"; did you mean `{guess}`?" if guess else ""
            raise ConfigError(
                f"unknown key `{key}`{hint} (a recipe has: {', '.join(TOP_LEVEL_KEYS)}){suffix}"
            )
        if key == "description" and not isinstance(value, str | None):
            raise ConfigError(f"bad value for `description`: expected text, got {value!r}")
        if key in ("seed", "num_threads") and not (
            value is None or (isinstance(value, int) and not isinstance(value, bool))
        ):
            raise ConfigError(f"bad value for `{key}`: expected int or null, got {value!r}{suffix}")
        if key == "num_threads" and value is not None and value < 1:
            raise ConfigError(f"bad value for `num_threads`: expected >= 1, got {value}{suffix}")


def _check_trainer(trainer: Any, overridden: set[str], recipe: Path | None) -> None:
    """``trainer`` against the signature of ``lightning.pytorch.Trainer`` (or its subclass)."""
    if not isinstance(trainer, dict):
        raise ConfigError(f"bad value for `trainer`: expected a mapping, got {trainer!r}")
    if "callbacks" in trainer:
        raise ConfigError(
            "`trainer.callbacks` is not used: list callbacks under the top-level `callbacks` "
            "mapping (name: {_target_: ...})"
        )
    trainer_cls, label = _trainer_class(), "lightning.pytorch.Trainer"
    if "_target_" in trainer:
        # Presets name the class so that `instantiate(cfg.trainer)` builds a Trainer; a subclass
        # is fine, anything else would not train the recipe.
        target = resolve_target(trainer["_target_"], "trainer")
        if not (isinstance(target, type) and issubclass(target, trainer_cls)):  # type: ignore[arg-type]
            where = _origin("trainer._target_", overridden, recipe)
            raise ConfigError(
                f"bad value for `trainer._target_`: expected lightning.pytorch.Trainer or a "
                f"subclass, got `{trainer['_target_']}`{where}"
            )
        trainer_cls, label = target, str(trainer["_target_"])
    _check_kwargs("trainer", trainer, trainer_cls, label, overridden, recipe, require=False)


def _check_callbacks(callbacks: Any, overridden: set[str], recipe: Path | None) -> None:
    """``callbacks``: a mapping name -> node with a ``_target_`` (null disables one)."""
    if not isinstance(callbacks, dict):
        raise ConfigError(
            f"bad value for `callbacks`: expected a mapping name -> {{_target_: ...}}, got "
            f"{type(callbacks).__name__}{_origin('callbacks', overridden, recipe)}"
        )
    for name, node in callbacks.items():
        if node is not None:
            _check_node(f"callbacks.{name}", node, overridden, recipe)


def iter_targets(plain: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, target) for every top-level node with a ``_target_`` (for listings)."""
    for key in ("model", "data"):
        node = plain.get(key)
        if isinstance(node, dict) and "_target_" in node:
            yield key, str(node["_target_"])
    for name, node in (plain.get("callbacks") or {}).items():
        if isinstance(node, dict) and "_target_" in node:
            yield f"callbacks.{name}", str(node["_target_"])

