"""RunningNorm.fold_into and exporting a policy with its normaliser (torch.export, ONNX)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from statplug import RunningNorm

SCALE = torch.tensor([1.0, 3.0, 0.2, 10.0, 0.5])
SHIFT = torch.tensor([0.0, -2.0, 1.0, 4.0, 0.3])


def data(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 5, generator=g) * SCALE + SHIFT).to(dtype)


def trained(**kwargs: object) -> RunningNorm:
    norm = RunningNorm(5, **kwargs)  # type: ignore[arg-type]
    norm.update(data(2000, 0, torch.float64))
    return norm.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps_on", ["var", "std"])
def test_fold_into_equals_linear_of_norm(dtype: torch.dtype, bias: bool, eps_on: str) -> None:
    torch.manual_seed(0)
    norm = trained(eps_on=eps_on, eps=1e-2)
    linear = nn.Linear(5, 3, bias=bias, dtype=dtype)
    folded = norm.fold_into(linear)
    assert folded.bias is not None and folded.weight.dtype == dtype
    assert folded is not linear and (linear.bias is None) == (not bias)  # linear untouched
    x = data(1000, 1, dtype)
    with torch.no_grad():
        expected = linear(norm(x))
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    # In float64 the fold is exact to rounding.
    if dtype == torch.float64:
        with torch.no_grad():
            torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)


def test_fold_into_identity_before_two_samples_and_constant_features() -> None:
    linear = nn.Linear(5, 2)
    folded = RunningNorm(5).fold_into(linear)
    torch.testing.assert_close(folded.weight, linear.weight)
    torch.testing.assert_close(folded.bias, linear.bias)
    norm = RunningNorm(2, eps=0.0)
    norm.update(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))  # feature 1 constant: maps to 0
    linear = nn.Linear(2, 1)
    folded = norm.eval().fold_into(linear)
    x = torch.tensor([[2.0, 5.0], [0.0, 7.0]])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), linear(norm(x)))
    assert folded.weight[0, 1].item() == 0.0


def test_fold_into_refuses_clip_and_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="clips its output to"):
        trained(clip=5.0).fold_into(nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"must be \(4,\), the in_features"):
        trained().fold_into(nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"must be a torch\.nn\.Linear"):
        trained().fold_into(nn.Conv1d(5, 2, 1))  # type: ignore[arg-type]


def policies() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    norm = trained()
    head = nn.Sequential(nn.Tanh(), nn.Linear(8, 2))
    first = nn.Linear(5, 8)
    unfolded = nn.Sequential(norm, first, head).eval()
    folded = nn.Sequential(norm.fold_into(first), head).eval()
    return unfolded, folded


def test_torch_export_unfolded_and_folded() -> None:
    x = data(64, 2)
    for policy in policies():
        program = torch.export.export(policy, (x,))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), policy(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        unfolded, folded = policies()
        torch.testing.assert_close(folded(x), unfolded(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch's exporter, not ours
def test_onnx_export_unfolded_and_folded(tmp_path: Path) -> None:
    x = data(64, 3)
    paths = []
    for name, policy in zip(("unfolded", "folded"), policies(), strict=True):
        program = torch.onnx.export(policy, (x,), dynamo=True, verbose=False)
        assert program is not None
        paths.append((tmp_path / f"{name}.onnx", policy))
        program.save(str(paths[-1][0]))
    ort = pytest.importorskip("onnxruntime")
    for path, policy in paths:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), policy(x), rtol=1e-5, atol=1e-5)
