"""torch.compile(fullgraph=True) of models holding stats: same results as eager, no recompiles.

The inductor backend compiles one model that holds every stat class (one compile for train, one
for eval); the policy matrix runs on ``aot_eager``, which traces the same graphs (dynamo +
functionalization, where a lost in-place write would show) without code generation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn

from statplug import EMAMoments, RunningMinMax, RunningMoments, RunningNorm

STAT_CLASSES = (RunningMoments, EMAMoments, RunningMinMax, RunningNorm)


class _AllStats(nn.Module):
    def __init__(self, policy: str) -> None:
        super().__init__()
        self.moments = RunningMoments(4, nan_policy=policy)
        self.ema = EMAMoments(4, momentum=0.1, nan_policy=policy)
        self.minmax = RunningMinMax(4, nan_policy=policy)
        self.norm = RunningNorm(4, clip=3.0, nan_policy=policy)
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.minmax(self.ema(self.moments(x)))
        return self.lin(self.norm(x))


def _batches(n: int, rows: int = 16, nan: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(rows, 4, generator=g) * 3 + torch.tensor([100.0, -5.0, 0.5, 1e3])
        if nan and i % 7 == 3:
            x[2, 1] = float("nan")
        out.append(x)
    return out


def _assert_same_state(compiled: nn.Module, eager: nn.Module, rtol: float = 1e-5) -> None:
    a, b = compiled.state_dict(), eager.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype in (torch.int64, torch.bool):
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=1e-4, equal_nan=True)
    # Raw buffers (hidden ones too) agree as well: nothing lives outside them.
    for (name, x), (_, y) in zip(compiled.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-4, equal_nan=True, msg=name)


def _run(backend: str, policy: str, n_updates: int, nan: bool = False) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _AllStats(policy)
    model = _AllStats(policy)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    batches = _batches(n_updates, nan=nan)
    y = compiled(batches[0])
    ref = eager(batches[0])
    # After the first (compiling) call, no update may recompile.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in batches[1:]:
            y, ref = compiled(x), eager(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert model.moments.count.item() == eager.moments.count.item()
    assert model.moments.count.item() > 0
    _assert_same_state(model, eager)
    # Eval mode: normalise only, still the same as eager, stats unchanged.
    model.eval(), eager.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = batches[-1] + 1.0
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-4, equal_nan=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_every_stat_class_compiles_with_inductor_in_train_and_eval() -> None:
    _run("inductor", "propagate", 100)


@pytest.mark.parametrize("policy", ["skip", "propagate"])
def test_fullgraph_matches_eager_without_recompiles(policy: str) -> None:
    _run("aot_eager", policy, 100)


def test_skip_policy_under_compile_drops_non_finite_rows_like_eager() -> None:
    _run("aot_eager", "skip", 30, nan=True)


def test_compiled_updates_match_float64_numpy() -> None:
    torch._dynamo.reset()
    stat = RunningMoments(4, nan_policy="propagate")
    compiled = torch.compile(stat, fullgraph=True, backend="aot_eager")
    batches = _batches(50)
    for x in batches:
        compiled(x)
    data = torch.cat(batches).double().numpy()
    assert stat.count.item() == len(data)
    np.testing.assert_allclose(stat.mean.double().numpy(), data.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stat.var.double().numpy(), data.var(0), rtol=1e-4)


@pytest.mark.parametrize("cls", STAT_CLASSES)
def test_raise_policy_compiles_and_reports_the_bad_batch_at_check(cls) -> None:
    """Under torch.compile the raise policy takes the device path: no host read to break the
    graph, the bad batch is left out, and the error (statplug's own message, naming the stat)
    surfaces at the next host read."""
    torch._dynamo.reset()
    stat, ref = cls(4), cls(4)
    stat.stat_name = "enc.stat"
    compiled = torch.compile(stat, fullgraph=True, backend="aot_eager")
    good = _batches(2)
    bad = torch.randn(16, 4)
    bad[0, 0] = float("nan")
    for x in (good[0], bad, good[1]):
        compiled(x)
    for x in good:
        ref(x)
    with pytest.raises(ValueError) as info:
        stat.state_dict()  # a checkpoint is a host read: the error surfaces here
    name = stat.moments.stat_name if cls is RunningNorm else "enc.stat"
    assert str(info.value).startswith(f"{name}: input contains NaN or Inf")
    _assert_same_state(stat, ref)  # reported once; the bad batch was left out


class _Float64Stats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        f64 = torch.float64
        self.moments = RunningMoments(4, accumulator_dtype=f64, nan_policy="propagate")
        self.ema = EMAMoments(4, momentum=0.1, accumulator_dtype=f64, nan_policy="skip")
        self.minmax = RunningMinMax(4, accumulator_dtype=f64, nan_policy="skip")
        self.norm = RunningNorm(4, accumulator_dtype=f64, nan_policy="propagate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.minmax(self.ema(self.moments(x))))


def test_ragged_batches_and_float64_state_compile_with_inductor() -> None:
    """A ragged last batch (DataLoader's default) and a large batch recompile with a dynamic
    batch dimension; every stat (float64 accumulators, EMA's weight included) still matches
    eager: the batch-norm statistics kernel, which has no fake kernel, stays off this path,
    and no in-place update of a 0-dim float64 buffer is lost."""
    torch._dynamo.reset()
    eager, model = _Float64Stats(), _Float64Stats()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    g = torch.Generator().manual_seed(1)
    for rows in (32, 32, 16, 4096, 7):
        x = torch.randn(rows, 4, generator=g) * 3 + 50.0
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    # Eager reduces float32 input with the float32 kernel, compiled code in float64.
    _assert_same_state(model, eager, rtol=1e-6)
    assert model.moments.count.item() == 32 + 32 + 16 + 4096 + 7
    assert 0.0 < model.ema.weight.item() < 1.0
    model.eval(), eager.eval()
    for rows in (5, 300):
        x = torch.randn(rows, 4, generator=g)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
