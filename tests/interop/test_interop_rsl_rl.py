"""statplug.interop against rsl_rl's EmpiricalNormalization (the real library)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from statplug import RunningNorm
from statplug.errors import MissingExtraError
from statplug.interop import from_rsl_rl, to_rsl_rl

pytest.importorskip("rsl_rl")
from rsl_rl.modules import EmpiricalNormalization

# One float32 ulp at 1 (absolute, for outputs near 0) or 1e-6 relative. Outputs are compared on
# float64 observations: both sides then normalise the same numbers with the same statistics
# (rsl_rl's float32 buffers promote), where float32 inputs would add the rounding of each side's
# own float32 subtraction (an ulp of the input, not of the output).
TOL = {"rtol": 1e-6, "atol": float(np.finfo(np.float32).eps)}
SCALE = torch.tensor([1.0, 3.0, 0.2, 10.0, 0.5])
SHIFT = torch.tensor([0.0, -2.0, 1.0, 40.0, 0.3])


def data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g) * SCALE + SHIFT


def trained(batches: int = 20, rows: int = 50) -> EmpiricalNormalization:
    en = EmpiricalNormalization(5)
    for i in range(batches):
        en.update(data(rows, i))
    return en


def test_from_rsl_rl_gives_its_outputs_and_count() -> None:
    en = trained().eval()
    norm = from_rsl_rl(en).eval()
    assert norm.eps_on == "std" and norm.eps == en.eps == 1e-2
    assert norm.count.dtype == torch.int64 and norm.count.item() == en.count.item() == 1000
    x = data(1000, 99).double()
    torch.testing.assert_close(norm(x).float(), en(x).float(), **TOL)


def test_loaded_from_its_state_dict() -> None:
    saved = trained().state_dict()
    en = EmpiricalNormalization(5)
    en.load_state_dict(saved)
    norm = from_rsl_rl(en)
    assert norm.count.item() == 1000
    torch.testing.assert_close(norm.mean.float(), saved["_mean"].squeeze(0), rtol=0, atol=0)


def test_round_trip_through_rsl_rl() -> None:
    source = trained().eval()
    norm = from_rsl_rl(source)
    target = EmpiricalNormalization(5, eps=0.5).eval()
    to_rsl_rl(norm, target)
    assert target.eps == 1e-2 and target.count.item() == 1000
    for name in ("_mean", "_var", "_std"):
        torch.testing.assert_close(getattr(target, name), getattr(source, name), **TOL)
    x = data(1000, 7).double()
    torch.testing.assert_close(target(x).float(), source(x).float(), **TOL)
    assert from_rsl_rl(target).count.item() == 1000


def test_statplug_normaliser_into_rsl_rl_keeps_outputs() -> None:
    norm = RunningNorm(5, eps_on="std", eps=1e-2)
    norm.update(data(5000, 3).double())
    en = EmpiricalNormalization(5).eval()
    to_rsl_rl(norm, en)
    x = data(1000, 4).double()
    torch.testing.assert_close(en(x).float(), norm.eval()(x).float(), **TOL)
    # rsl_rl keeps learning from there, as from its own state.
    en.train()
    en.update(data(100, 5))
    assert en.count.item() == 5100


def test_until_reached_comes_back_frozen() -> None:
    en = EmpiricalNormalization(5, until=100)
    en.update(data(150, 0))
    assert from_rsl_rl(en).frozen
    assert not from_rsl_rl(EmpiricalNormalization(5, until=100)).frozen


def test_empty_writes_rsl_rl_fresh_state() -> None:
    en = trained(batches=2)
    to_rsl_rl(RunningNorm(5, eps_on="std", eps=1e-2), en)
    fresh = EmpiricalNormalization(5)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(en.state_dict()[key], value, rtol=0, atol=0)
    assert from_rsl_rl(en).count.item() == 0


def test_misuse_names_the_argument() -> None:
    en = trained(batches=1)
    with pytest.raises(ValueError, match="must be an rsl_rl EmpiricalNormalization"):
        from_rsl_rl(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="eps_on='std' and clip=None"):
        to_rsl_rl(RunningNorm(5), en)
    with pytest.raises(ValueError, match="eps_on='std' and clip=None"):
        to_rsl_rl(RunningNorm(5, eps_on="std", clip=5.0), en)
    with pytest.raises(ValueError, match=r"shape \(4,\) does not match"):
        to_rsl_rl(RunningNorm(4, eps_on="std"), en)


def test_missing_rsl_rl_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rsl_rl", None)
    with pytest.raises(MissingExtraError, match=r"rsl-rl-lib.*statplug\[rsl-rl\]"):
        from_rsl_rl(object())
