"""Which ``_target_`` a config read back from a checkpoint may build without ``--trust``.

Trust follows authorship. What the user types on the command line and the YAML files the user
names are the user's own intent and build whatever they name. A config stored in a checkpoint is
a file someone else may have written, and ``hydra.utils.instantiate`` imports and calls whatever
a ``_target_`` names (``builtins.open``, ``shutil.copyfile``, ``torch.save`` ...). Unless the user
passes ``--trust``, every ``_target_`` anywhere in such a config (nested nodes, ``_args_`` lists,
``_partial_`` nodes) must be

* a public class of one of :data:`ALLOWED_PACKAGES` that is a subclass of that package's base
  (any statplug class; a Lightning ``Callback`` of ``lightning.pytorch.callbacks``, a ``Logger``
  of ``lightning.pytorch.loggers``, a torchmetrics ``Metric``), named by a path of public modules
  of that package (resolved here step by step, never through an attribute of an object outside
  it, so neither ``statplug.inspect.checkpoint.torch.load`` nor ``statplugx.evil`` passes), or
* one of :data:`ALLOWED_TARGETS` (``lightning.pytorch.Trainer``), compared as exact strings.

Nothing outside those packages is imported to decide, so a refused name never runs module code.

Hydra resolves OmegaConf interpolations again when it instantiates (twice: ``OmegaConf.resolve``
on its copy, then again as it reads each value), so a string that reads
``${oc.create:{_target_: ...}}`` after the config was resolved would become a node to build.
Without ``--trust`` no such string reaches Hydra (:func:`check_literal_text`); with it,
:func:`escape_for_hydra` keeps the text as it is.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from statplug.config.errors import ConfigError

__all__ = [
    "ALLOWED_PACKAGES",
    "ALLOWED_TARGETS",
    "allowed_description",
    "check_literal_text",
    "check_targets",
    "escape_for_hydra",
    "escape_interpolations",
    "is_allowed_target",
    "iter_all_targets",
    "upgrade_targets",
]

ALLOWED_TARGETS: frozenset[str] = frozenset({"lightning.pytorch.Trainer"})
# Package -> (module, class) of the base every allowed class of that package derives from.
ALLOWED_PACKAGES: dict[str, tuple[str, str] | None] = {
    "statplug": None,  # any public statplug class
    "lightning.pytorch.callbacks": ("lightning.pytorch.callbacks", "Callback"),
    "lightning.pytorch.loggers": ("lightning.pytorch.loggers", "Logger"),
    "torchmetrics": ("torchmetrics", "Metric"),
}
_PACKAGE = "statplug"


_MISSING = object()  # a name inside an allowed package that names nothing: validation says so
_OUTSIDE = object()  # a name that leaves the package's public modules on the way
_NOT_LOADED = object()  # undecided without importing a module not imported yet


def _package_of(target: str) -> str | None:
    """The allowed package ``target`` is named under (the longest match), or None."""
    matches = [p for p in ALLOWED_PACKAGES if target == p or target.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def _in_package(module: ModuleType, package: str) -> bool:
    return module.__name__ == package or module.__name__.startswith(package + ".")


def _package_object(target: str, package: str, *, load: bool = True) -> Any:
    """The object ``target`` names inside ``package``, ``_MISSING`` or ``_OUTSIDE``.

    Resolved like Hydra's ``_locate`` (attribute, else submodule), but every step before the last
    must be a module of ``package`` and no step may be private (``_x``), which also rules out
    dunder attributes such as ``__globals__`` or ``__builtins__``. With ``load=False`` nothing is
    imported (module ``__getattr__`` hooks are bypassed too) and ``_NOT_LOADED`` says the answer
    needs an import.
    """
    parts = target.split(".")
    if not all(p.isidentifier() and not p.startswith("_") for p in parts):
        return _OUTSIDE
    depth = package.count(".") + 1
    obj: Any = sys.modules.get(package)
    if obj is None:
        if not load:
            return _NOT_LOADED
        obj = importlib.import_module(package)
    for i, part in enumerate(parts[depth:], start=depth):
        if not isinstance(obj, ModuleType) or not _in_package(obj, package):
            return _OUTSIDE
        name = ".".join(parts[: i + 1])
        child = getattr(obj, part, _MISSING) if load else vars(obj).get(part, _MISSING)
        if child is _MISSING:
            if not load:
                return sys.modules.get(name, _NOT_LOADED)  # type: ignore[call-overload]
            try:
                child = importlib.import_module(name)
            except ImportError:
                return _MISSING
        obj = child
    return obj


def _is_allowed_class(obj: Any, package: str) -> bool:
    module = getattr(obj, "__module__", None) or ""
    if inspect.isfunction(obj) and module.startswith(_RECIPE_FUNCTIONS):
        return True  # a recipe's own helper, such as statplug.recipes.padding_mask
    if not (inspect.isclass(obj) and (module == package or module.startswith(package + "."))):
        return False
    base = ALLOWED_PACKAGES[package]
    if base is None:
        return True
    return issubclass(obj, getattr(importlib.import_module(base[0]), base[1]))


# Plain functions a stored config may name (as `_partial_` callables): the recipes' own.
_RECIPE_FUNCTIONS = "statplug.recipes."


def is_allowed_target(target: Any) -> bool:
    """Whether a config read from a checkpoint may build ``target`` without ``--trust``."""
    if not isinstance(target, str):
        return False
    if target in ALLOWED_TARGETS:
        return True
    package = _package_of(target)
    return package is not None and _is_allowed_class(_package_object(target, package), package)


def _refused(target: Any, *, load: bool) -> bool:
    """Whether ``target`` is refused; with ``load=False``, only what is decided without imports.

    A name inside an allowed package that names nothing is not refused here: validation reports
    the typo with the closest valid name.
    """
    if not isinstance(target, str):
        return True
    if target in ALLOWED_TARGETS:
        return False
    package = _package_of(target)
    if package is None:
        return True
    obj = _package_object(target, package, load=load)
    if obj is _MISSING or obj is _NOT_LOADED:
        return False
    if not load and obj is not _OUTSIDE and isinstance(obj, ModuleType):
        return False  # a module reached without imports: the full pass resolves what follows
    return not _is_allowed_class(obj, package)


def allowed_description() -> str:
    """The allowlist in words, for messages."""
    packages = [f"{p}.*" for p in ALLOWED_PACKAGES if p != _PACKAGE]
    return "statplug's own classes and recipe functions, " + ", ".join(
        [*sorted(ALLOWED_TARGETS), *packages]
    )


def iter_all_targets(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, target)`` for every ``_target_`` anywhere in a plain config, depth first."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node["_target_"]
        for key, value in node.items():
            yield from iter_all_targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from iter_all_targets(value, f"{where}.{i}" if where else str(i))


def check_targets(node: Any, *, where: str = "", origin: str = "") -> None:
    """Refuse the first ``_target_`` in ``node`` that is not allowed without ``--trust``.

    What can be decided without importing anything is decided first (names outside the allowed
    packages, paths through modules already imported), so a hostile config is refused before the
    modules its other targets name are imported to check those.

    Args:
        node: a plain (resolved) config or one node of it.
        where: the key of ``node`` in the whole config, for messages.
        origin: where the config came from (``the config stored in checkpoint `run.ckpt```).
            Default: a config read from a file.

    Raises:
        ConfigError: one line naming the key, the target, where it came from and ``--trust``.
    """
    targets = list(iter_all_targets(node, where))
    refused = next((kt for kt in targets if _refused(kt[1], load=False)), None) or next(
        (kt for kt in targets if _refused(kt[1], load=True)), None
    )
    if refused is None:
        return
    key, target = refused
    shown = target if isinstance(target, str) else repr(target)
    raise ConfigError(
        f"`{key + '.' if key else ''}_target_`: refusing to build `{shown}` named by "
        f"{origin or 'a config read from a file'}: without --trust such a config builds only "
        f"{allowed_description()}; pass --trust if you trust this file and the code it names"
    )


# Targets of modules that moved, in configs written before the move (a checkpoint stored by an
# older `statplug fit`): old prefix -> new prefix.
_MOVED_TARGETS = {"statplug.recipes_lib.": "statplug.recipes."}


def upgrade_targets(node: Any) -> Any:
    """A copy of a plain config whose ``_target_`` names use the current module paths."""
    if isinstance(node, dict):
        out = {k: upgrade_targets(v) for k, v in node.items()}
        target = out.get("_target_")
        for old, new in _MOVED_TARGETS.items():
            if isinstance(target, str) and target.startswith(old):
                out["_target_"] = new + target.removeprefix(old)
        return out
    if isinstance(node, list | tuple):
        return type(node)(upgrade_targets(v) for v in node)
    return node


_INTERPOLATION = re.compile(r"(\\*)\$\{")


def escape_interpolations(node: Any) -> Any:
    """A copy of a resolved plain config whose strings OmegaConf will read as literal text.

    ``${`` becomes ``\\${`` (and backslashes just before it are doubled), OmegaConf's escape.
    """
    if isinstance(node, str):
        if "${" not in node:
            return node
        return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", node)
    if isinstance(node, dict):
        return {k: escape_interpolations(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(escape_interpolations(v) for v in node)
    return node


def _first_interpolation_text(node: Any, where: str) -> str | None:
    if isinstance(node, str):
        return where if "${" in node else None
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(
        node, list | tuple) else ()
    for key, value in items:
        found = _first_interpolation_text(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def check_literal_text(node: Any, *, where: str = "") -> None:
    """Refuse text containing ``${`` in a node about to be built without ``--trust``.

    Such text only comes from an escaped interpolation (or a stored config) and Hydra would read
    it as an interpolation again; ``${oc.create:...}`` builds any ``_target_``.

    Raises:
        ConfigError: one line naming the key and ``--trust``.
    """
    key = _first_interpolation_text(node, where)
    if key is not None:
        raise ConfigError(
            f"`{key}`: refusing to pass text containing `${{` to a constructor: Hydra would "
            "resolve it again as an interpolation (which can build any `_target_`); pass --trust "
            "if you trust this config"
        )


def escape_for_hydra(node: Any) -> Any:
    """A resolved plain config escaped for ``hydra.utils.instantiate``'s two resolutions."""
    return escape_interpolations(escape_interpolations(node))
