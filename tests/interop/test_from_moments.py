"""RunningNorm.from_moments: the generic way in for another library's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statplug import RunningNorm


def test_integer_counts_are_exact_int64() -> None:
    big = 2**60 + 1  # no float holds it
    for count in (big, np.int64(big), torch.tensor(big)):
        norm = RunningNorm.from_moments([1.0, 2.0], [4.0, 9.0], count)
        assert norm.count.dtype == torch.int64 and norm.count.item() == big
        torch.testing.assert_close(norm.var, torch.tensor([4.0, 9.0], dtype=torch.float64))


def test_float_counts_are_rounded() -> None:
    assert RunningNorm.from_moments([0.0], [1.0], 1234.0001).count.item() == 1234
    assert RunningNorm.from_moments([0.0], [1.0], np.float32(7.6)).count.item() == 8
    empty = RunningNorm.from_moments([5.0], [1.0], 1e-4)  # gymnasium's fresh prior
    assert empty.count.item() == 0 and empty.mean.item() == 0.0 and empty.var.item() == 0.0


def test_numpy_and_tensor_inputs_keep_outputs() -> None:
    mean = np.array([3.0, -1.0, 1e4])
    var = np.array([0.5, 2.0, 9.0])
    norm = RunningNorm.from_moments(mean, torch.from_numpy(var), 500, eps=1e-8).eval()
    x = np.random.default_rng(0).normal(size=(1000, 3)) * np.sqrt(var) + mean
    ref = (x - mean) / np.sqrt(var + 1e-8)
    np.testing.assert_allclose(norm(torch.from_numpy(x)).numpy(), ref, rtol=1e-12, atol=1e-12)


def test_settings_and_state() -> None:
    norm = RunningNorm.from_moments(
        torch.tensor(2.0), torch.tensor(4.0), 10, eps=1e-2, clip=3.0, eps_on="std",
        accumulator_dtype=torch.float32,
    )
    assert norm.moments.shape == (1,)  # a 0-dim mean is one feature
    assert (norm.eps, norm.clip, norm.eps_on) == (1e-2, 3.0, "std")
    assert norm.mean.dtype == torch.float32 and not norm.frozen
    assert norm.moments.m2.item() == 40.0
    # Held as a loaded state: the agreed state a sync starts from, so it counts once.
    assert norm.moments.agreed("count").item() == 10
    # Later data merges exactly.
    norm.update(torch.full((10, 1), 2.0))
    assert norm.count.item() == 20 and norm.var.item() == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1.0], [1.0], -1), "`count` must be a number of samples"),
        (([1.0], [1.0], float("nan")), "`count` must be a number of samples"),
        (([1.0], [1.0], True), "`count` must be a number of samples"),
        (([1.0], [1.0], "10"), "`count` must be a number of samples"),
        (([1.0, 2.0], [1.0], 10), "same shape"),
        (([1.0], [-1.0], 10), "`var` must be finite and >= 0"),
        (([float("inf")], [1.0], 10), "every `mean` must be finite"),
        ((["a"], [1.0], 10), "`mean` must be a sequence or tensor of real numbers"),
    ],
)
def test_misuse_names_the_argument(args: tuple[object, object, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunningNorm.from_moments(*args)  # type: ignore[arg-type]


def test_not_representable_in_float32() -> None:
    with pytest.raises(ValueError, match=r"accumulator_dtype=torch\.float64"):
        RunningNorm.from_moments([0.0], [1e30], 10**10, accumulator_dtype=torch.float32)
