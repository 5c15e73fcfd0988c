"""Which ``_target_`` a config may build: statplug's own classes and a short allowlist.

Files are data, not code. A recipe, a ``configs/`` fragment or a config stored in a checkpoint
names the classes to build with ``_target_``, and ``hydra.utils.instantiate`` imports and calls
whatever it names (``builtins.open``, ``shutil.copyfile``, ``torch.save`` ...). Unless the user
passes ``--trust``, every ``_target_`` anywhere in a config (nested nodes, ``_args_`` lists,
``_partial_`` nodes) must be

* a public class defined in statplug, named by a path of public statplug modules (resolved here
  step by step, never through an attribute of a non-statplug object, so neither
  ``statplug.config.checkpoint.torch.load`` nor ``statplugx.evil`` passes), or
* one of :data:`ALLOWED_TARGETS`, compared as exact strings (the torch and Lightning classes the
  bundled recipes need).

Nothing outside statplug is imported to decide, so a refused name never runs module code.

Hydra resolves OmegaConf interpolations again when it instantiates, so a string that reads
``${oc.create:{_target_: ...}}`` after the config was resolved would become a node to build:
:func:`escape_interpolations` keeps such strings literal.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from statplug.config.errors import ConfigError

__all__ = [
    "ALLOWED_TARGETS",
    "check_targets",
    "escape_interpolations",
    "is_allowed_target",
    "iter_all_targets",
]

ALLOWED_TARGETS: frozenset[str] = frozenset(
    {
        "lightning.pytorch.Trainer",
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.loggers.csv_logs.CSVLogger",
    }
)
# Other spellings of an allowed class, left out of messages.
_ALIASES = frozenset({"lightning.pytorch.loggers.csv_logs.CSVLogger"})
_PACKAGE = "statplug"


_MISSING = object()  # a statplug.* name that names nothing: validation suggests the fix
_OUTSIDE = object()  # a name that leaves statplug's public modules on the way


def _statplug_object(target: str) -> Any:
    """The object ``target`` names inside statplug, ``_MISSING`` or ``_OUTSIDE``.

    Resolved like Hydra's ``_locate`` (attribute, else submodule), but every step before the last
    must be a statplug module and no step may be private (``_x``), which also rules out dunder
    attributes such as ``__globals__`` or ``__builtins__``.
    """
    parts = target.split(".")
    if parts[0] != _PACKAGE or not all(p.isidentifier() and not p.startswith("_") for p in parts):
        return _OUTSIDE
    obj: Any = importlib.import_module(_PACKAGE)
    for i, part in enumerate(parts[1:], start=1):
        if not isinstance(obj, ModuleType) or not (
            obj.__name__ == _PACKAGE or obj.__name__.startswith(_PACKAGE + ".")
        ):
            return _OUTSIDE
        child = getattr(obj, part, _MISSING)
        if child is _MISSING:
            try:
                child = importlib.import_module(".".join(parts[: i + 1]))
            except ImportError:
                return _MISSING
        obj = child
    return obj


def is_allowed_target(target: Any) -> bool:
    """Whether a config may build ``target`` without ``--trust``."""
    if not isinstance(target, str):
        return False
    if target in ALLOWED_TARGETS:
        return True
    obj = _statplug_object(target)
    module = getattr(obj, "__module__", None) or ""
    return inspect.isclass(obj) and (module == _PACKAGE or module.startswith(_PACKAGE + "."))


def _names_nothing_in_statplug(target: Any) -> bool:
    """A ``statplug.*`` name that does not exist: validation reports the typo and its fix."""
    return isinstance(target, str) and _statplug_object(target) is _MISSING


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


def _outside_by_name(target: Any) -> bool:
    """Refused from the text alone: not a string, or neither allowlisted nor ``statplug.*``."""
    if not isinstance(target, str):
        return True
    return target not in ALLOWED_TARGETS and target.split(".")[0] != _PACKAGE


def check_targets(node: Any, *, where: str = "", origin: str = "") -> None:
    """Refuse the first ``_target_`` in ``node`` that is not allowed without ``--trust``.

    Names outside statplug are refused from their text first, so a hostile config is refused
    before any statplug module is imported to check the others.

    Args:
        node: a plain (resolved) config or one node of it.
        where: the key of ``node`` in the whole config, for messages.
        origin: where the config came from, appended to the message (`` (in run.ckpt)``).

    Raises:
        ConfigError: one line naming the key, the target and ``--trust``.
    """
    targets = list(iter_all_targets(node, where))
    refused = next((kt for kt in targets if _outside_by_name(kt[1])), None) or next(
        (
            kt
            for kt in targets
            if not (is_allowed_target(kt[1]) or _names_nothing_in_statplug(kt[1]))
        ),
        None,
    )
    if refused is None:
        return
    key, target = refused
    shown = target if isinstance(target, str) else repr(target)
    allowed = ", ".join(sorted(t for t in ALLOWED_TARGETS if t not in _ALIASES))
    raise ConfigError(
        f"`{key + '.' if key else ''}_target_`: refusing to build `{shown}`: without --trust "
        f"a config builds only statplug's own classes and {allowed}; pass --trust if you "
        f"trust this config and the code it names{origin}"
    )


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
