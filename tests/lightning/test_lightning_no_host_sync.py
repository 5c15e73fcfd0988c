"""The per-step paths of the callbacks never read a tensor on the host (a GPU stream stall).

On the CPU the stats read their ``count`` on the host on purpose (a memory read, nothing to wait
for); the guard switches that off, so these tests drive the path accelerators take.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from statplug import ActivationStats, MagnitudePruning

_SCALAR_READS = frozenset({"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal"})


class _NoScalarReads(TorchDispatchMode):
    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        if str(func.overloadpacket) in _SCALAR_READS:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_sync() -> Iterator[None]:
    def fail(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host sync through a Tensor method")

    with pytest.MonkeyPatch.context() as mp:
        for module in ("statplug.stats.merge", "statplug.stats.base", "statplug.stats.holder",
                       "statplug.stats.quantiles", "statplug.stats.norm"):
            mp.setattr(f"{module}.host_reads_free", lambda t: False)  # the accelerator path
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            mp.setattr(torch.Tensor, name, fail)
        with _NoScalarReads():
            yield


def test_activation_stats_and_pruning_forward_without_host_reads() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    stats = ActivationStats()
    stats.attach(model)
    pruning = MagnitudePruning(0.5)
    pruning.setup(None, model, "fit")  # type: ignore[arg-type]
    pruning.prune_(model, 0.5)
    x = torch.randn(16, 3, 8, 8)
    with no_host_sync():
        for _ in range(40):  # past the stats' 32-update fold
            with stats.recording():
                out = model(x)
            out.sum().backward()
            with torch.no_grad():
                model[3].weight.sub_(0.01 * model[3].weight.grad)  # the next forward re-masks
    assert int(stats.layer_stats["0"][0].count) == 40 * 16 * 6 * 6  # per channel
    assert int(stats.layer_stats["3"][0].count) == 40 * 16
    model(x)  # re-masks after the last update
    assert bool((model[3].weight[~model[3].weight_mask] == 0).all())
