"""The one error the config layer raises, :class:`ConfigError` (defined with statplug's other
errors), and :func:`closest`, which names the valid key nearest to a misspelled one."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from omegaconf.errors import OmegaConfBaseException

from statplug.errors import ConfigError

__all__ = ["OMEGACONF_ERRORS", "ConfigError", "closest", "first_line"]

# OmegaConf's interpolation grammar is parsed recursively: a deeply nested one (a few KB of
# brackets) ends in RecursionError instead of one of its own errors.
OMEGACONF_ERRORS = (OmegaConfBaseException, RecursionError)


def first_line(err: BaseException) -> str:
    """The first line of an OmegaConf error, for a one-line message."""
    if isinstance(err, RecursionError):
        return "an interpolation nests too deeply"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (difflib), or None when nothing is close."""
    options = sorted(set(candidates))
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if match:
        return match[0]
    # A key under the wrong parent: compare the last dotted part alone.
    tail = word.rsplit(".", 1)[-1]
    tails = {c.rsplit(".", 1)[-1]: c for c in options}
    match = difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.75)
    return tails[match[0]] if match else None
