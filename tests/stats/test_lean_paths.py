"""The lean update and normalise paths (issue 21, second round): each against an independent
reference -- float64 numpy over the same data, or a fresh normaliser built from the same state.

- one observation per update merges without a batch spread (``NO_SPREAD``);
- the skip policy on the CPU looks for bad rows only in a batch whose statistics are not finite;
- ``RunningNorm`` in eval mode keeps its parameters while its statistics' tensors are unchanged:
  every way the statistics change must show in the next output.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from statplug import EMAMoments, RunningMinMax, RunningMoments, RunningNorm, RunningQuantiles
from statplug.stats import merge


def _ref_norm(data: np.ndarray, x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """float64 numpy: ``x`` normalised by the population moments of ``data``."""
    return (x - data.mean(0)) / np.sqrt(data.var(0) + eps)


# ---------------------------------------------------------------------- one observation a step
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_one_observation_at_a_time_matches_numpy(acc: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((500, 5)) * [1, 10, 0.1, 3, 1e3] + [0, 5, -2, 1e4, 7]).astype(
        np.float32
    )
    stat = RunningMoments(5, accumulator_dtype=acc)
    for row in data:
        stat.update(torch.from_numpy(row).reshape(1, 5))
    ref = data.astype(np.float64)
    # float32 state: its mean's ulp at 1e4 (1e-3) rounds each merge (measured 1.3e-4).
    tol = 1e-11 if acc == torch.float64 else 1e-3
    np.testing.assert_allclose(stat.mean.double().numpy(), ref.mean(0), rtol=tol, atol=tol)
    np.testing.assert_allclose(stat.var.double().numpy(), ref.var(0), rtol=tol)
    assert int(stat.count) == 500


def test_no_spread_is_never_written() -> None:
    stat = RunningMoments(3)
    for _ in range(3):
        stat.update(torch.randn(1, 3))
    assert float(merge.NO_SPREAD) == 0.0 and merge.NO_SPREAD.shape == ()


@pytest.mark.parametrize("policy", ["raise", "skip", "propagate"])
def test_one_bad_observation_follows_the_policy(policy: str) -> None:
    stat = RunningMoments(2, nan_policy=policy)  # type: ignore[arg-type]
    stat.update(torch.tensor([[1.0, 2.0]]))
    bad = torch.tensor([[float("nan"), 1.0]])
    if policy == "raise":
        with pytest.raises(ValueError, match="NaN or Inf"):
            stat.update(bad)
        assert int(stat.count) == 1 and stat.mean.tolist() == [1.0, 2.0]
    elif policy == "skip":
        stat.update(bad)
        assert int(stat.count) == 1 and int(stat.n_skipped) == 1
        assert stat.mean.tolist() == [1.0, 2.0]
    else:
        stat.update(bad)
        assert int(stat.count) == 2 and bool(stat.mean[0].isnan())


# ---------------------------------------------------------------------- skip policy on the CPU
@pytest.mark.parametrize("rows", [3, 300, 5000])
@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments, RunningMinMax, RunningQuantiles])
def test_skip_drops_exactly_the_bad_rows_at_every_batch_size(cls: type, rows: int) -> None:
    """Small (plain ops), medium (kernel) and large (grouped kernel) batches: the rows holding a
    NaN or Inf are dropped and counted, and the rest equals a stat fed only the clean rows."""
    rng = np.random.default_rng(rows)
    x = torch.from_numpy(rng.normal(3.0, 2.0, size=(rows, 4)).astype(np.float32))
    bad = torch.zeros(rows, dtype=torch.bool)
    bad[:: max(rows // 3, 1)] = True
    x[bad, 1] = float("nan")
    x[bad.nonzero()[-1], 2] = float("inf")
    skipping, clean = cls(4, nan_policy="skip"), cls(4)
    skipping.update(x)
    clean.update(x[~bad])
    assert int(skipping.n_skipped) == int(bad.sum())
    assert int(skipping.count) == int(clean.count) == rows - int(bad.sum())
    for key, value in clean.state_dict().items():
        if key != "n_skipped":
            torch.testing.assert_close(skipping.state_dict()[key], value, rtol=0, atol=0)


def test_skip_with_a_clean_batch_takes_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean batch is never searched for bad rows (counted, not timed)."""
    from statplug.stats.base import Stat

    searched: list[int] = []
    real = Stat._skip

    def counted(self: Stat, rows: torch.Tensor, weight: torch.Tensor | None):  # type: ignore[no-untyped-def]
        searched.append(rows.shape[0])
        return real(self, rows, weight)

    monkeypatch.setattr(Stat, "_skip", counted)
    stat = RunningMoments(8, nan_policy="skip")
    stat.update(torch.randn(4096, 8))
    assert searched == []
    x = torch.randn(4096, 8)
    x[5, 3] = float("nan")
    stat.update(x)
    assert searched == [4096] and int(stat.n_skipped) == 1


def test_skip_with_finite_rows_too_large_for_float32_state_raises() -> None:
    """Finite rows whose spread overflows a float32 accumulator are no bad rows to drop: the
    error says so, as under 'raise'."""
    stat = RunningMoments(1, accumulator_dtype=torch.float32, nan_policy="skip")
    with pytest.raises(ValueError, match=r"too large for a torch.float32 .*float64"):
        stat.update(torch.tensor([[-3e38], [3e38]]))
    assert int(stat.count) == 0 and int(stat.n_skipped) == 0


# ---------------------------------------------------------------------- eval parameters kept
def _fed_norm(scale: float = 1.0) -> RunningNorm:
    norm = RunningNorm(3, eps=0.25)  # eps matters for eps_on
    norm.update(torch.tensor([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0], [5.0, 1.0, 0.0]]) * scale)
    return norm.eval()


X = torch.tensor([[2.0, 2.0, 2.0], [0.0, 1.0, 4.0]])


def _expected(norm: RunningNorm) -> torch.Tensor:
    """The output of a fresh normaliser holding the same state (nothing kept from before)."""
    fresh = RunningNorm(norm.moments.shape, eps=norm.eps, eps_on=norm.eps_on)
    fresh.load_state_dict(copy.deepcopy(norm.state_dict()))
    return fresh.eval()(X)


CHANGES = {
    "update": lambda n: n.update(torch.tensor([[10.0, -10.0, 0.5]])),
    "train forward": lambda n: (n.train()(torch.tensor([[7.0, 7.0, 7.0]])), n.eval()),
    "load_state_dict": lambda n: n.load_state_dict(_other_state()),
    "reset": lambda n: n.reset(),
    "merge_": lambda n: n.merge_(_fed_norm(scale=3.0)),
    "direct in-place write": lambda n: n.moments.m2.mul_(4.0),
    "eps": lambda n: setattr(n, "eps", 0.5),
    "eps_on": lambda n: setattr(n, "eps_on", "std"),
    "double": lambda n: n.double(),
    "deepcopy": lambda n: None,
}


def _other_state() -> dict[str, torch.Tensor]:
    other = RunningNorm(3)
    other.update(torch.randn(10, 3) * 4 + 1)
    return other.state_dict()


@pytest.mark.parametrize("change", list(CHANGES))
def test_eval_output_follows_every_change_of_the_statistics(change: str) -> None:
    norm = _fed_norm()
    before = norm(X)
    norm(X)  # the parameters are kept now
    CHANGES[change](norm)
    if change == "deepcopy":
        norm = copy.deepcopy(norm)
    after = norm(X.to(norm.moments.accumulator_dtype) if change == "double" else X)
    torch.testing.assert_close(after.to(X.dtype), _expected(norm).to(X.dtype))
    if change not in ("deepcopy", "double"):
        assert not torch.equal(after, before)


def test_eval_output_with_grad_backpropagates_twice() -> None:
    """The kept parameters are fresh tensors that no update writes: two eval forwards and a
    backward through both work, and the gradient is the scale (independent reference)."""
    norm = _fed_norm()
    x = X.clone().requires_grad_(True)
    (norm(x).sum() + norm(x).sum()).backward()
    scale = 1 / torch.sqrt(norm.var + norm.eps)
    torch.testing.assert_close(x.grad, 2 * scale.float().expand_as(X))


def test_eval_matches_numpy_at_kernel_sizes() -> None:
    """Batches larger than the plain-op size take BatchNorm's kernel: same numbers."""
    rng = np.random.default_rng(5)
    data = rng.normal(2.0, 3.0, size=(2000, 64))
    norm = RunningNorm(64)
    norm.update(torch.from_numpy(data))
    norm.eval()
    x = rng.normal(2.0, 3.0, size=(1024, 64)).astype(np.float32)
    for _ in range(2):
        out = norm(torch.from_numpy(x)).double().numpy()
        np.testing.assert_allclose(out, _ref_norm(data, x.astype(np.float64)), atol=2e-5)


# ---------------------------------------------------------------------- writes torch does not count
def _write_numpy_view(norm: RunningNorm) -> None:
    norm.moments.m2.numpy()[:] *= 4.0  # a numpy view of the buffer: no version bump


def _write_data(norm: RunningNorm) -> None:
    norm.moments.mean.data.copy_(torch.tensor([9.0, -9.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("write", [_write_numpy_view, _write_data])
def test_eval_output_follows_writes_that_bypass_version_counters(write) -> None:  # type: ignore[no-untyped-def]
    """Shared memory written by another process, collectives writing the buffers, and
    Lightning's weight-averaging swap (``.data``) all bypass torch's version counters."""
    norm = _fed_norm()
    before = norm(X)
    write(norm)
    after = norm(X)
    torch.testing.assert_close(after, _expected(norm))
    assert not torch.equal(after, before)


def _broadcast_body(rank: int, world: int) -> list[list[float]]:
    import torch.distributed as dist

    norm = RunningNorm(2).eval()
    norm.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]) * (rank + 1))
    x = torch.tensor([[2.0, 4.0]])
    norm(x)  # parameters kept from this rank's statistics
    for buf in (norm.moments.count, norm.moments.mean, norm.moments.m2):
        dist.broadcast(buf, src=0)  # writes the buffers without a version bump
    return norm(x).tolist()


def test_eval_output_follows_a_collective_writing_the_buffers() -> None:
    from dist_utils import run_distributed

    out = run_distributed(_broadcast_body, 2)
    assert out[0] == out[1]  # rank 1 now normalises by rank 0's statistics


def test_a_normaliser_built_in_inference_mode_normalises_in_eval() -> None:
    with torch.inference_mode():
        norm = RunningNorm.fixed([0.5, 1.0], [0.25, 2.0])
    assert norm(torch.tensor([[1.0, 3.0]])).tolist() == [[2.0, 1.0]]
    assert norm(torch.tensor([[1.0, 3.0]])).tolist() == [[2.0, 1.0]]


# ---------------------------------------------------------------------- float32 state, wider input
@pytest.mark.parametrize("rows", [1, 100, 2000])
@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments])
def test_float64_input_too_large_for_float32_state_raises(cls: type, rows: int) -> None:
    stat = cls(4, accumulator_dtype=torch.float32)
    big = torch.full((rows, 4), 1e39, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"NaN or Inf.*float64"):
        stat.update(big)
    assert int(stat.count) == 0


def test_a_spread_too_large_for_float32_state_raises() -> None:
    """Each value fits float32, their variance (1e40) does not: under "raise" it is an error."""
    stat = RunningMoments(2, accumulator_dtype=torch.float32)
    x = torch.tensor([[1e20, -1e20], [-1e20, 1e20]] * 50, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        stat.update(x)
    assert int(stat.count) == 0


def test_a_failed_skip_retry_leaves_the_stat_unchanged() -> None:
    stat = RunningMoments(1, accumulator_dtype=torch.float32, nan_policy="skip")
    stat.update(torch.tensor([[1.0], [2.0]]))
    before = copy.deepcopy(stat.state_dict())
    with pytest.raises(ValueError, match="too large"):
        stat.update(torch.tensor([[float("nan")], [-3e38], [3e38]]))
    for key, value in stat.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_update_runs_without_grad_even_on_buffers_that_require_it() -> None:
    """DESIGN §1: an update never builds a graph, whatever requires grad."""
    stat = RunningMoments(2)
    stat.m2.requires_grad_(True)  # a misconfigured stat (the audit reports it), still updates
    x = torch.tensor([[1.0, 2.0], [3.0, 8.0]], requires_grad=True)
    stat.update(x)
    assert stat.m2.grad_fn is None and stat.mean.grad_fn is None
    np.testing.assert_allclose(stat.m2.detach().numpy(), [2.0, 18.0])


def test_inverse_of_a_multi_dimensional_normaliser() -> None:
    rng = np.random.default_rng(9)
    data = rng.normal(3.0, 2.0, size=(50, 2, 3))
    norm = RunningNorm((2, 3))
    norm.update(torch.from_numpy(data))
    x = torch.from_numpy(rng.normal(3.0, 2.0, size=(4, 2, 3)))
    torch.testing.assert_close(norm.eval().inverse(norm(x)), x)
