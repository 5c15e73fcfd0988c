"""Allowed ranges of recipe arguments, declared on the constructor's parameters with ``Annotated``.

A recipe's model or data module says which values make sense where it takes them::

    def __init__(self, hidden: Size = 64, dropout: Probability = 0.1, lr: LearningRate = 1e-3)

and :func:`statplug.config.validate` checks every value of a recipe against its parameter's
range before anything is built, so ``model.lr=1e400`` or ``model.hidden=-0`` stops at once with
exit status 2 and one line (key, value, range) instead of training to NaN. ``Annotated`` keeps
the plain type for type checkers and for Lightning's own argument parsing.

>>> Range(low=0.0, low_open=True).problem(float("nan"))
'expected a finite number > 0'
>>> str(Range(low=0.0, high=1.0, high_open=True))
'in [0, 1)'
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

__all__ = [
    "LearningRate",
    "NonNegative",
    "Positive",
    "Probability",
    "Range",
    "Size",
    "range_of",
]


def _number(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of finite numbers; None leaves a side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return (f"in {'(' if self.low_open else '['}{_number(lo)}, "
                    f"{_number(hi)}{')' if self.high_open else ']'}")
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {_number(lo)}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {_number(hi)}"
        return ""

    def problem(self, value: float) -> str | None:
        """None when ``value`` is in the range, else what was expected (NaN and inf never are)."""
        lo, hi = self.low, self.high
        if (
            not math.isfinite(value)
            or (lo is not None and (value < lo or (self.low_open and value == lo)))
            or (hi is not None and (value > hi or (self.high_open and value == hi)))
        ):
            return f"expected a finite number {self}".rstrip()
        return None


Positive = Annotated[float, Range(low=0.0, low_open=True)]
NonNegative = Annotated[float, Range(low=0.0)]
LearningRate = Positive
Probability = Annotated[float, Range(low=0.0, high=1.0, high_open=True)]  # dropout: [0, 1)
Size = Annotated[int, Range(low=1)]  # widths, depths, counts, batch sizes


def range_of(annotation: Any) -> Range | None:
    """The :class:`Range` an ``Annotated`` annotation carries (also inside ``X | None``)."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, Range):
            return meta
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = range_of(arg)
            if found is not None:
                return found
    return None
