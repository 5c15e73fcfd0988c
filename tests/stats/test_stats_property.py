"""Property test (issue 13): any input, any saved state -- a right answer or a clean refusal.

Hypothesis feeds every stat random call sequences: updates with random dtypes (float16/32/64,
bfloat16, integers, bool, complex), shapes (right, wrong, empty, extra sample dims) and values
(NaN, Inf, huge, tiny, offsets up to 1e8), and loads of random corruptions of a valid state dict.
Each call either succeeds and the stat matches float64 numpy, or raises a ``StatplugError``,
``ValueError`` or ``TypeError`` and leaves every persistent buffer bit-identical.

What "matches" allows (see ``_var_slack``): float32 rounding of batch moments and of the stored
accumulator, and -- for ``nan_policy="propagate"``, which never reads the device and so never
recomputes a batch -- the one-kernel error at large offsets, ``(rows * eps * |mean|)**2`` (the
``"raise"`` policy recomputes such batches, ``"skip"`` reduces in float64). A state the
accumulator cannot hold (values near its maximum or below its smallest normal) may come out
non-finite or flushed to zero instead of raising, except under ``"raise"``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from state_reference import as_rows, reference_for, same_bits
from torch import nn

from statplug import EMAMoments, RunningMinMax, RunningMoments, RunningNorm, StatplugError
from statplug.stats.merge import GROUP_ROWS

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
CLASSES = (RunningMoments, EMAMoments, RunningMinMax, RunningNorm)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64,
          torch.uint8, torch.bool, torch.complex64)
REFUSALS = (StatplugError, ValueError, TypeError)


def _make(cls: type, policy: str, acc: torch.dtype) -> nn.Module:
    kw = {"momentum": 0.5} if cls is EMAMoments else {}
    return cls(3, accumulator_dtype=acc, nan_policy=policy, **kw)


@st.composite
def batches(draw: st.DrawFn) -> torch.Tensor | list[float]:
    if draw(st.integers(0, 30)) == 0:
        return [[1.0, 2.0, 3.0]]  # not a tensor
    n = draw(st.sampled_from([0, 1, 2, 5, 40, 1100]))
    lead = draw(st.sampled_from([(n,), (1, n), (n, 1)]))
    width = draw(st.sampled_from([3, 3, 3, 3, 4]))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e4, -1e6, 1e8]))
    scale = draw(st.sampled_from([1.0, 1e-3, 100.0, 1e-30, 1e30]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = offset + scale * rng.standard_normal((*lead, width))
    if draw(st.booleans()):  # a few special values
        flat = values.reshape(-1)
        for _ in range(draw(st.integers(1, 3))):
            if flat.size:
                flat[draw(st.integers(0, flat.size - 1))] = draw(
                    st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-40, 2e38])
                )
    dtype = draw(st.sampled_from(DTYPES))
    if dtype.is_floating_point or dtype.is_complex:
        return torch.from_numpy(values).to(dtype)
    return torch.from_numpy(np.nan_to_num(values, posinf=0, neginf=0).clip(-1e6, 1e6)).to(dtype)


def _var_slack(policy: str, rows: np.ndarray, mean: np.ndarray, batch_rows: int) -> np.ndarray:
    """Absolute variance error allowed on top of 1e-3 relative (see the module docstring)."""
    eps32 = 2.0**-23
    r = min(batch_rows, 2 * GROUP_ROWS)
    budget = r if policy == "propagate" else math.sqrt(r)
    return (budget * eps32 * np.abs(mean)) ** 2 + (8 * eps32 * np.abs(mean)) ** 2


def _fits(ref_values: dict[str, np.ndarray], acc: torch.dtype) -> bool:
    info = torch.finfo(acc)
    for v in ref_values.values():
        v = np.asarray(v, dtype=np.float64)
        finite = v[np.isfinite(v)]
        if (np.abs(finite) > info.max / 4).any():
            return False
        if ((finite != 0) & (np.abs(finite) < info.tiny * 2**24)).any():
            return False
    return True


def _matches(stat: nn.Module, ref, policy: str, acc: torch.dtype, last_rows: int) -> None:
    m = stat.moments if isinstance(stat, RunningNorm) else stat
    assert int(m.count) == ref.count and int(m.n_skipped) == ref.n_skipped
    exp = ref.expected()
    if isinstance(m, RunningMoments):
        exp = {"mean": exp["mean"], "var": exp["var"], "m2": exp["m2"]}
    if not _fits(exp, acc):  # an accumulator that cannot hold the answer: no claim
        return
    if policy == "propagate" and not _fits(exp, torch.float32):
        # propagate never reads the device, so it never refines: float32 input goes through the
        # float32 kernel, whose sums overflow past float32's range (documented in design notes).
        return
    if isinstance(m, RunningMinMax):
        for k in ("min", "max"):
            want = torch.from_numpy(exp[k]).to(acc)
            assert torch.equal(getattr(m, k).isnan(), want.isnan())
            ok = ~want.isnan()
            assert torch.equal(getattr(m, k)[ok], want[ok])
        return
    got_mean = m.mean.double().reshape(-1).numpy()
    got_var = m.var.double().reshape(-1).numpy()
    bad = ~np.isfinite(exp["mean"]) | ~np.isfinite(exp["var"])
    assert not np.isfinite(got_var[bad] + got_mean[bad]).any()
    ok = ~bad
    with np.errstate(over="ignore", invalid="ignore"):
        std = np.sqrt(exp["var"][ok])
        mean_err = np.abs(got_mean[ok] - exp["mean"][ok])
        assert (mean_err <= 1e-5 * (np.abs(exp["mean"][ok]) + std) + 1e-30).all()
        slack = _var_slack(policy, np.empty(0), exp["mean"][ok], last_rows)
        var_err = np.abs(got_var[ok] - exp["var"][ok])
        assert (var_err <= 1e-3 * exp["var"][ok] + slack + 1e-30).all(), (got_var, exp["var"])


@pytest.mark.parametrize("cls", CLASSES)
@SETTINGS
@given(data=st.data())
def test_any_update_sequence_is_right_or_refused_unchanged(cls: type, data: st.DataObject) -> None:
    policy = data.draw(st.sampled_from(["raise", "skip", "propagate"]))
    acc = data.draw(st.sampled_from([torch.float32, torch.float64]))
    stat = _make(cls, policy, acc)
    ref = reference_for(stat)
    largest = 1
    for _ in range(data.draw(st.integers(1, 3))):
        x = data.draw(batches())
        before = copy.deepcopy(stat)
        try:
            stat.update(x) if cls is not RunningNorm else stat.train()(x)
        except REFUSALS:
            assert same_bits(stat, before)
            continue
        rows = as_rows(x, 3)  # type: ignore[arg-type]
        if len(rows):
            ref.update(rows, policy)
            largest = max(largest, len(rows))
        _matches(stat, ref, policy, acc, largest)


def _corrupt(data: st.DataObject, sd: dict[str, torch.Tensor]) -> dict[str, object]:
    sd = dict(sd)
    key = data.draw(st.sampled_from(sorted(sd)))
    how = data.draw(st.sampled_from(
        ["negative", "fraction", "nan", "inf", "shape", "complex", "drop", "extra", "python",
         "huge", "bool", "float_count", "ok"]
    ))
    v = sd[key]
    if how == "negative":
        out = torch.int64 if v.dtype == torch.bool else v.dtype
        sd[key] = -(v.to(torch.float64).abs() + 1).to(out)
    elif how == "fraction":
        sd[key] = v.double() + 0.5
    elif how == "nan":
        sd[key] = torch.full_like(v.double(), math.nan)
    elif how == "inf":
        sd[key] = torch.full_like(v.double(), math.inf)
    elif how == "shape":
        sd[key] = torch.zeros(*v.shape, 2)
    elif how == "complex":
        sd[key] = v.to(torch.complex64)
    elif how == "drop":
        del sd[key]
    elif how == "extra":
        sd["bogus"] = torch.zeros(3)
    elif how == "python":
        sd[key] = v.tolist()
    elif how == "huge":
        sd[key] = torch.full_like(v.double(), 1e300)
    elif how == "bool":
        sd[key] = v.bool()
    elif how == "float_count":
        sd[key] = v.double()
    return sd


@pytest.mark.parametrize("cls", CLASSES)
@SETTINGS
@given(data=st.data())
def test_any_state_dict_loads_exactly_or_is_refused_unchanged(cls: type, data) -> None:
    acc = data.draw(st.sampled_from([torch.float32, torch.float64]))
    src = _make(cls, "raise", acc)
    src.update(torch.randn(6, 3) * 3 + 1)
    stat = _make(cls, "raise", acc)
    stat.update(torch.randn(4, 3))
    sd = _corrupt(data, src.state_dict())
    strict = data.draw(st.booleans())
    before = copy.deepcopy(stat)
    try:
        stat.load_state_dict(sd, strict=strict)  # type: ignore[arg-type]
    except REFUSALS:
        assert same_bits(stat, before)
        return
    except RuntimeError as err:  # torch's own strict-key report: only for keys no stat owns
        assert "bogus" in str(err), err
        return
    # Loaded: every saved value, in the stat's dtypes.
    for key, value in stat.state_dict().items():
        if key not in sd:  # n_skipped / frozen_flag: older layouts load with their defaults
            assert key.rsplit(".", 1)[-1] in ("n_skipped", "frozen_flag") and not value.any()
            continue
        given_value = sd[key]
        assert isinstance(given_value, torch.Tensor)
        assert torch.equal(value, given_value.to(value.dtype)) or (
            value.is_floating_point() and torch.equal(value.isnan(), given_value.isnan())
        )
