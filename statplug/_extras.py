"""Optional dependencies: the ``recipes`` extra (scikit-learn, matplotlib) and the RL libraries
of :mod:`statplug.interop` (the ``gymnasium``, ``sb3`` and ``rsl-rl`` extras).

The core (stats, sync, audit, Lightning callbacks, ``statplug inspect``) imports none of them; the
recipes' sklearn data sets and ``statplug plot`` do, through :func:`require`, so a missing
package gives one line naming the extra instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from statplug.errors import MissingExtraError

__all__ = ["EXTRA_PACKAGES", "require"]

# import name -> (package name, extra)
EXTRA_PACKAGES: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "recipes"),
    "matplotlib": ("matplotlib", "recipes"),
    # statplug.interop: one extra per reinforcement-learning library.
    "gymnasium": ("gymnasium", "gymnasium"),
    "stable_baselines3": ("stable-baselines3", "sb3"),
    "rsl_rl": ("rsl-rl-lib", "rsl-rl"),
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.partition(".")[0] != module.partition(".")[0]:
            raise  # the package is there but something it needs is not: not ours to rename
        package, extra = EXTRA_PACKAGES[module.partition(".")[0]]
        raise MissingExtraError(
            f"{feature} needs {package}, which is not installed; it comes with the `{extra}` "
            f"extra: pip install 'statplug[{extra}]'"
        ) from None
