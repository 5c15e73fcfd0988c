"""Tests for statplug.encodings: SinusoidalEncoding, RotaryEncoding (DESIGN.md section 2, issue 4).

References are computed independently in float64 with NumPy (sinusoidal formula, complex-number
rotation), never with the module's own helpers.
"""

from __future__ import annotations

import doctest
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import statplug.encodings
from statplug.encodings import RotaryEncoding, SinusoidalEncoding
from statplug.masks import CausalMask, RandomMask

DERIVED = {"pe", "inv_freq", "cos_cached", "sin_cached"}


def sinusoidal_reference(length: int, dim: int, base: float = 10000.0) -> np.ndarray:
    pe = np.zeros((length, dim), dtype=np.float64)
    for t in range(length):
        for j in range(dim):
            i = j // 2
            angle = t / base ** (2 * i / dim)
            pe[t, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


def rotary_angles_reference(positions: np.ndarray, dim: int, base: float = 10000.0) -> np.ndarray:
    theta = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    return positions.astype(np.float64)[..., None] * theta


def rotary_reference(x: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Rotate-half RoPE via complex numbers: z_i = x_i + i x_{i+d/2}, z_i *= exp(i t theta_i)."""
    dim = x.shape[-1]
    half = dim // 2
    z = x[..., :half].astype(np.complex128) + 1j * x[..., half:]
    z = z * np.exp(1j * rotary_angles_reference(positions, dim, base))
    return np.concatenate([z.real, z.imag], axis=-1)


def wrapped(a: np.ndarray) -> np.ndarray:
    """Angles mapped into (-pi, pi]."""
    return np.angle(np.exp(1j * a))


class Model(nn.Module):
    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.sin = SinusoidalEncoding(8, max_len=max_len)
        self.rope = RotaryEncoding(8, max_len=max_len)
        self.causal = CausalMask(max_len)
        self.drop = RandomMask((8,), 0.25, seed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.sin(self.proj(x)))
        q, k = self.rope(h, h)
        mask = self.causal.mask(x.shape[-2])
        return nn.functional.scaled_dot_product_attention(q, k, h, attn_mask=mask)


# ------------------------------------------------------------------------------------- Sinusoidal


@pytest.mark.parametrize("dim", [16, 7])
def test_sinusoidal_matches_float64_formula(dim: int) -> None:
    enc = SinusoidalEncoding(dim, max_len=64)
    ref = sinusoidal_reference(300, dim)
    assert enc.pe.dtype == torch.float32
    np.testing.assert_allclose(enc.pe.double().numpy(), ref[:64], rtol=0, atol=1e-6)
    # through forward, past max_len (the table regrows), with a float64 input
    out = enc(torch.zeros(2, 300, dim, dtype=torch.float64))
    assert out.dtype == torch.float64 and enc.pe.shape == (300, dim)
    np.testing.assert_allclose(out[1].numpy(), ref, rtol=0, atol=1e-6)
    # float32 input: x + pe
    x = torch.randn(3, 100, dim)
    np.testing.assert_allclose(
        (enc(x).double() - x.double()).numpy(), np.broadcast_to(ref[:100], (3, 100, dim)), atol=1e-6
    )


def test_sinusoidal_rejects_wrong_feature_size() -> None:
    with pytest.raises(
        ValueError, match=r"expected `x` of shape \[\.\.\., T, 16\] \(got \[2, 5, 8\]\)"
    ):
        SinusoidalEncoding(16)(torch.zeros(2, 5, 8))


# ----------------------------------------------------------------------------------------- Rotary


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rotary_matches_float64_reference_rotation(dtype: torch.dtype) -> None:
    atol = 1e-6 if dtype == torch.float64 else 1e-5
    torch.manual_seed(0)
    rope = RotaryEncoding(32, max_len=16)
    q = torch.randn(2, 3, 40, 32, dtype=dtype)  # longer than max_len: regrows
    k = torch.randn(2, 3, 25, 32, dtype=dtype)  # different length from q
    qr, kr = rope(q, k)
    assert qr.dtype == kr.dtype == dtype
    np.testing.assert_allclose(
        qr.double().numpy(), rotary_reference(q.double().numpy(), np.arange(40)), atol=atol
    )
    np.testing.assert_allclose(
        kr.double().numpy(), rotary_reference(k.double().numpy(), np.arange(25)), atol=atol
    )
    # explicit positions (e.g. decoding at an offset), shared by q and k
    pos = torch.arange(1000, 1040)
    qp, kp = rope(q, q, positions=pos)
    expected = rotary_reference(q.double().numpy(), pos.numpy())
    np.testing.assert_allclose(qp.double().numpy(), expected, atol=atol)
    np.testing.assert_allclose(kp.double().numpy(), expected, atol=atol)
    # explicit positions 0..T-1 agree with the cached path
    qa, _ = rope(q, q, positions=torch.arange(40))
    torch.testing.assert_close(qa, qr, rtol=0, atol=atol)


def test_rotary_angles_at_8191_in_bf16_model() -> None:
    dim, pos = 64, 8191
    rope = RotaryEncoding(dim, max_len=128).to(torch.bfloat16)
    assert rope.inv_freq.dtype == rope.cos_cached.dtype == rope.sin_cached.dtype == torch.float32
    ref = wrapped(rotary_angles_reference(np.array(pos), dim))
    half = dim // 2
    # a unit vector in the first slot of every pair rotates to (cos, sin) of its angle
    unit = torch.zeros(1, pos + 1, dim)
    unit[..., :half] = 1.0
    for positions in (None, torch.tensor([pos])):
        x = unit if positions is None else unit[:, -1:]
        out, _ = rope(x, x, positions=positions)
        got = torch.atan2(out[0, -1, half:].double(), out[0, -1, :half].double()).numpy()
        err = np.abs(wrapped(got - ref))
        assert err.max() < 1e-3, err.max()
    # the cached table itself
    cached = torch.atan2(rope.sin_cached[pos].double(), rope.cos_cached[pos].double()).numpy()
    assert np.abs(wrapped(cached - ref)).max() < 1e-3
    # the test can see the bug it guards against: bf16 angles are far off
    theta_bf16 = torch.tensor(10000.0 ** (-np.arange(0, dim, 2) / dim)).to(torch.bfloat16)
    bad = (torch.tensor(float(pos), dtype=torch.bfloat16) * theta_bf16).double().numpy()
    assert np.abs(wrapped(bad - ref)).max() > 1e-1


def test_rotary_validation() -> None:
    with pytest.raises(ValueError, match=r"`dim` must be even.*got 7"):
        RotaryEncoding(7)
    rope = RotaryEncoding(8)
    with pytest.raises(ValueError, match=r"expected `k` of shape \[\.\.\., T, 8\]"):
        rope(torch.zeros(4, 8), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="`positions` of shape \\[5\\] must broadcast"):
        rope(torch.zeros(4, 8), torch.zeros(4, 8), positions=torch.arange(5))
    with pytest.raises(ValueError, match="`positions` must be an integer or floating"):
        rope(torch.zeros(4, 8), torch.zeros(4, 8), positions=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("cls", [SinusoidalEncoding, RotaryEncoding])
@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"dim": 0}, "dim"),
        ({"dim": 8, "max_len": 0}, "max_len"),
        ({"dim": 8, "max_len": True}, "max_len"),
        ({"dim": 8, "base": -1.0}, "base"),
        ({"dim": 8, "base": float("nan")}, "base"),
        ({"dim": 8, "base": "10000"}, "base"),
    ],
)
def test_encodings_reject_bad_arguments(cls: type, kwargs: dict[str, object], arg: str) -> None:
    kwargs = dict(kwargs)  # parametrize shares the dict between classes
    dim = kwargs.pop("dim")
    with pytest.raises(ValueError, match=f"`{arg}`.*got"):
        cls(dim, **kwargs)


# ---------------------------------------------------------------- shared contract for both


def derived_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in DERIVED}


def test_meta_to_empty_reset_parameters_recomputes() -> None:
    reference = Model(max_len=32)
    with torch.device("meta"):
        model = Model(max_len=32)
    assert all(b.is_meta for b in model.buffers())
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for name, buf in reference.named_buffers():
        got = dict(model.named_buffers())[name]
        assert got.dtype == buf.dtype and torch.equal(got, buf), name
    np.testing.assert_allclose(
        model.sin.pe.double().numpy(), sinusoidal_reference(32, 8), atol=1e-6
    )

    # .to("meta") and back: garbage until reset_parameters, then correct again
    model.sin(torch.zeros(1, 50, 8))  # grown caches are rebuilt at max_len
    model.to("meta").to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for name, buf in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buf), name


@pytest.mark.parametrize("convert", ["half", "bfloat16"])
def test_low_precision_model_keeps_float32_tables_and_input_dtype(convert: str) -> None:
    model = Model(max_len=16)
    model = model.half() if convert == "half" else model.to(torch.bfloat16)
    low = torch.float16 if convert == "half" else torch.bfloat16
    assert model.proj.weight.dtype == low
    for name, buf in derived_buffers(model).items():
        assert buf.dtype == torch.float32, name
    for dtype in (low, torch.float32):
        x = torch.randn(2, 5, 8, dtype=dtype)
        assert model.sin(x).dtype == dtype
        q, k = model.rope(x, x)
        assert q.dtype == k.dtype == dtype
        q, k = model.rope(x, x, positions=torch.arange(5))
        assert q.dtype == k.dtype == dtype
    assert model(torch.randn(2, 40, 8, dtype=low)).dtype == low  # regrows past max_len
    for name, buf in derived_buffers(model).items():
        assert buf.dtype == torch.float32, name


@pytest.mark.parametrize("cls", [SinusoidalEncoding, RotaryEncoding])
def test_expected_buffers_are_the_tables_at_their_current_length(cls: type) -> None:
    enc = cls(8, max_len=4)
    if cls is SinusoidalEncoding:
        enc(torch.zeros(1, 10, 8))  # regrows to 10 positions
    else:
        enc(torch.zeros(1, 10, 8), torch.zeros(1, 10, 8))
    expected = enc.expected_buffers()
    assert set(expected) == {n for n, _ in enc.named_buffers()}
    for name, value in expected.items():
        assert torch.equal(value, getattr(enc, name)), name
    with torch.no_grad():
        next(iter(enc.buffers())).add_(1.0)
    assert not all(torch.equal(v, getattr(enc, n)) for n, v in enc.expected_buffers().items())


def test_no_derived_buffer_in_state_dict() -> None:
    model = Model(max_len=16)
    model(torch.randn(1, 40, 8))  # regrow every cache first
    keys = set(model.state_dict())
    assert keys == {"proj.weight", "proj.bias", "drop.mask", "drop.seed"}
    assert set(derived_buffers(model)) == {
        "sin.pe",
        "rope.inv_freq",
        "rope.cos_cached",
        "rope.sin_cached",
    }
    assert "causal.mask" in dict(model.named_buffers())


@pytest.mark.parametrize(("saved_len", "loaded_len"), [(128, 512), (512, 128)])
def test_checkpoint_loads_strictly_across_max_len(saved_len: int, loaded_len: int) -> None:
    torch.manual_seed(0)
    src = Model(max_len=saved_len)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    torch.manual_seed(1)
    dst = Model(max_len=loaded_len)
    result = dst.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(dst.drop.mask, src.drop.mask) and int(dst.drop.seed) == int(src.drop.seed)
    assert dst.sin.pe.shape[0] == loaded_len  # derived tables untouched by the load
    x = torch.randn(2, 200, 8)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=1e-6)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(statplug.encodings, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
