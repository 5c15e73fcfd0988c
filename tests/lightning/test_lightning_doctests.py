"""The docstring examples of statplug.lightning run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "statplug.lightning.mixin",
    "statplug.lightning.callbacks.sync_stats",
    "statplug.lightning.callbacks.audit_buffers",
    "statplug.lightning.callbacks.activation_stats",
    "statplug.lightning.callbacks.magnitude_pruning",
    "statplug.lightning.callbacks.stats_monitor",
    "statplug.lightning.callbacks.stats_weight_averaging",
    "statplug.lightning.callbacks.stats_ema_weight_averaging",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
