"""statplug's exceptions: every misuse error is a :class:`StatplugError`."""

from __future__ import annotations

__all__ = [
    "AuditError",
    "CheckpointMismatchError",
    "ConfigError",
    "IncompatibleCallbackError",
    "MissingExtraError",
    "StatLayoutError",
    "StatplugError",
]


class StatplugError(Exception):
    """Base class of every error statplug raises for misuse (bad arguments raise ``ValueError``)."""


class StatLayoutError(StatplugError):
    """Ranks hold different stat layouts, so their state cannot be merged."""


class CheckpointMismatchError(StatplugError):
    """A checkpoint does not hold the stats the model declares."""


class MissingExtraError(StatplugError, ImportError):
    """A feature needs a package of an optional extra (``pip install 'statplug[recipes]'``)."""


class AuditError(StatplugError):
    """:func:`statplug.audit` found errors; the message lists every one."""


class IncompatibleCallbackError(StatplugError):
    """A callback in the ``Trainer`` would corrupt statplug state (the message names the fix)."""


class ConfigError(StatplugError):
    """A recipe, a config fragment, an override or a file named on the command line is wrong; the
    message is one line for the user.

    The command line prints it on stderr and exits with status 2, without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always one line
