"""Recipe arguments are checked before the fit: exit 2 and one line with key, value and range."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from cli_helpers import run_subprocess

from statplug.config import ConfigError, load_recipe
from statplug.config.ranges import Range

# override -> (key, value as printed, allowed range as printed)
BAD = {
    "model.lr=1e400": ("model.lr", "inf", "> 0"),  # overflows to inf: trained to NaN before
    "model.lr=.nan": ("model.lr", "nan", "> 0"),
    "model.lr=0": ("model.lr", "0", "> 0"),
    "model.dropout=.nan": ("model.dropout", "nan", "in [0, 1)"),
    "model.dropout=1.0": ("model.dropout", "1.0", "in [0, 1)"),
    "model.hidden=-0": ("model.hidden", "0", ">= 1"),  # a zero-width MLP trained before
    "data.batch_size=0": ("data.batch_size", "0", ">= 1"),
    "model.weight_decay=-.inf": ("model.weight_decay", "-inf", ">= 0"),
    "trainer.gradient_clip_val=.nan": ("trainer.gradient_clip_val", "nan", "finite"),
}


@pytest.mark.parametrize("override", sorted(BAD))
def test_bad_recipe_arguments_stop_before_the_fit(override: str, tmp_path: Path) -> None:
    key, value, allowed = BAD[override]
    res = run_subprocess(["fit", "tabular", override], tmp_path)
    assert res.code == 2, (res.code, res.err[-3000:])
    lines = res.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.err, res.err[-3000:]
    assert f"`{key}`" in lines[0] and f"got {value}" in lines[0] and allowed in lines[0]
    assert res.out == "" and not any(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize("recipe", ["digits", "tinylm"])
def test_every_recipe_declares_its_ranges(recipe: str) -> None:
    field = {"digits": "model.channels=[16, 0]", "tinylm": "model.heads=0"}[recipe]
    with pytest.raises(ConfigError, match=r">= 1, got 0"):
        load_recipe(recipe, [field])


@pytest.mark.parametrize(
    ("bounds", "inside", "outside"),
    [
        (Range(low=0.0, low_open=True), [1e-300, 1.0, 1e300], [0.0, -1.0, math.inf, math.nan]),
        (Range(low=0.0, high=1.0, high_open=True), [0.0, 0.5, 1 - 1e-16],
         [1.0, -1e-300, math.nan]),
        (Range(low=1), [1, 10**9], [0, -1, math.inf]),
        (Range(), [-1e308, 0.0, 1e308], [math.inf, -math.inf, math.nan]),
    ],
)
def test_range_accepts_exactly_its_interval(
    bounds: Range, inside: list[float], outside: list[float]
) -> None:
    assert all(bounds.problem(v) is None for v in inside)
    assert all(bounds.problem(v) == f"expected a finite number {bounds}".rstrip() for v in outside)


def test_the_ranges_docstring_examples_run() -> None:
    import doctest

    import statplug.config.ranges

    result = doctest.testmod(statplug.config.ranges)
    assert result.attempted >= 2 and result.failed == 0
