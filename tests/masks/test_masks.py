"""Tests for statplug.masks: CausalMask and RandomMask (DESIGN.md section 2, issue 4)."""

from __future__ import annotations

import doctest
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed  # tests/ is on sys.path via its conftest.py
from torch import nn

import statplug.masks
from statplug.masks import CausalMask, RandomMask


def causal_reference(n: int) -> torch.Tensor:
    """True where key j <= query i, built by comparison rather than triangular ops."""
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    return j <= i


# --------------------------------------------------------------------------------------- CausalMask


def test_causal_mask_regrows_and_matches_reference() -> None:
    causal = CausalMask(8)
    assert dict(causal.named_buffers())["mask"].shape == (8, 8)
    m = causal.mask(32)
    assert m.dtype == torch.bool and m.shape == (32, 32)
    assert torch.equal(m, causal_reference(32))
    # the cache was regrown and stays derived: not saved
    assert dict(causal.named_buffers())["mask"].shape == (32, 32)
    assert list(causal.state_dict()) == []
    # shorter requests are slices of the cache
    assert torch.equal(causal.mask(5), causal_reference(5))
    assert torch.equal(causal(7), causal_reference(7))


def test_causal_mask_equals_sdpa_is_causal() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 32, 16) for _ in range(3))
    causal = CausalMask(8)
    ours = F.scaled_dot_product_attention(q, k, v, attn_mask=causal.mask(32))
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_causal_mask_meta_to_empty_reset() -> None:
    with torch.device("meta"):
        causal = CausalMask(16)
    assert dict(causal.named_buffers())["mask"].is_meta
    causal.to_empty(device="cpu")
    causal.reset_parameters()
    assert torch.equal(dict(causal.named_buffers())["mask"], causal_reference(16))
    # and a round trip through meta
    causal.mask(40)
    causal.to("meta").to_empty(device="cpu")
    causal.reset_parameters()
    assert torch.equal(causal.mask(40), causal_reference(40))


def test_causal_mask_dtype_conversions_keep_bool() -> None:
    for convert in (nn.Module.half, lambda m: m.to(torch.bfloat16)):
        causal = convert(CausalMask(8))
        assert causal.mask(12).dtype == torch.bool
        assert torch.equal(causal.mask(12), causal_reference(12))


@pytest.mark.parametrize(("bad", "arg"), [(0, "max_len"), (-3, "max_len"), (2.5, "max_len")])
def test_causal_mask_rejects_bad_max_len(bad: object, arg: str) -> None:
    with pytest.raises(ValueError, match=f"`{arg}`.*got {bad}"):
        CausalMask(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- RandomMask


def test_random_mask_keep_probability_and_determinism() -> None:
    m = RandomMask((200, 200), 0.3, seed=11)
    assert m.mask.dtype == torch.bool and m.mask.shape == (200, 200)
    kept = m.mask.double().mean().item()
    assert abs(kept - 0.7) < 0.01  # ~4 standard deviations
    assert torch.equal(m.mask, RandomMask((200, 200), 0.3, seed=11).mask)
    assert not torch.equal(m.mask, RandomMask((200, 200), 0.3, seed=12).mask)
    assert RandomMask(50, 0.0, seed=3).mask.all()
    assert int(m.seed) == 11 and m.seed.dtype == torch.int64 and m.seed.dim() == 0


def test_random_mask_does_not_touch_global_rng() -> None:
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    RandomMask((32, 32), 0.5, seed=1)
    assert torch.equal(torch.rand(4), expected)
    # nor depends on it
    torch.manual_seed(123)
    a = RandomMask((32, 32), 0.5, seed=1).mask
    torch.manual_seed(456)
    assert torch.equal(a, RandomMask((32, 32), 0.5, seed=1).mask)


def test_random_mask_resample_equals_fresh() -> None:
    m = RandomMask((10, 20), 0.4, seed=0)
    buffer = m.mask
    assert m.resample_(99) is m
    assert torch.equal(m.mask, RandomMask((10, 20), 0.4, seed=99).mask)
    assert m.mask is buffer  # in place: the registered tensor is kept
    assert int(m.seed) == 99


def test_random_mask_state_dict_reloads_bit_identically(tmp_path: object) -> None:
    src = RandomMask((17, 5), 0.5, seed=2024)
    assert sorted(src.state_dict()) == ["mask", "seed"]

    dst = RandomMask((17, 5), 0.5, seed=1)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert torch.equal(dst.mask, src.mask) and int(dst.seed) == 2024
    # the Python-side seed follows the loaded buffer: a reset reproduces the loaded mask
    dst.reset_parameters()
    assert torch.equal(dst.mask, src.mask)

    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    again = RandomMask((17, 5), 0.5, seed=7)
    again.load_state_dict(loaded, strict=True)
    assert torch.equal(again.mask, src.mask) and int(again.seed) == 2024


def test_random_mask_meta_to_empty_reset() -> None:
    with torch.device("meta"):
        m = RandomMask((8, 9), 0.25, seed=42)
    assert m.mask.is_meta and m.seed.is_meta
    m.to_empty(device="cpu")
    m.reset_parameters()
    fresh = RandomMask((8, 9), 0.25, seed=42)
    assert torch.equal(m.mask, fresh.mask) and int(m.seed) == 42
    m.to("meta").to_empty(device="cpu")
    m.reset_parameters()
    assert torch.equal(m.mask, fresh.mask)


def test_random_mask_dtype_conversions_and_forward_dtype() -> None:
    for convert in (nn.Module.half, lambda mod: mod.to(torch.bfloat16)):
        m = convert(RandomMask((4, 6), 0.5, seed=0))
        assert m.mask.dtype == torch.bool and m.seed.dtype == torch.int64
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.ones(3, 4, 6, dtype=dtype)
            y = m(x)
            assert y.dtype == dtype
            assert torch.equal(y, torch.where(m.mask, x, torch.zeros_like(x)))


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"shape": 4, "p": 1.0, "seed": 0}, "p"),
        ({"shape": 4, "p": -0.1, "seed": 0}, "p"),
        ({"shape": 4, "p": float("nan"), "seed": 0}, "p"),
        ({"shape": 4, "p": True, "seed": 0}, "p"),
        ({"shape": 0, "p": 0.5, "seed": 0}, "shape"),
        ({"shape": (3, -1), "p": 0.5, "seed": 0}, "shape"),
        ({"shape": 4, "p": 0.5, "seed": -1}, "seed"),
        ({"shape": 4, "p": 0.5, "seed": 2**63}, "seed"),
        ({"shape": 4, "p": 0.5, "seed": 1.5}, "seed"),
    ],
)
def test_random_mask_rejects_bad_arguments(kwargs: dict[str, object], arg: str) -> None:
    with pytest.raises(ValueError, match=f"`{arg}`.*got"):
        RandomMask(kwargs["shape"], kwargs["p"], seed=kwargs["seed"])  # type: ignore[arg-type]


def _build_on_rank(
    rank: int, world_size: int, shape: tuple[int, ...], p: float, seed: int
) -> bytes:
    torch.manual_seed(1000 + rank)  # different global RNG state on each rank
    m = RandomMask(shape, p, seed=seed)
    mine = m.mask.to(torch.uint8).flatten()
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    for other in gathered:
        if not torch.equal(other, mine):
            raise AssertionError(f"rank {rank}: masks differ across ranks")
    return bytes(mine.tolist())


@pytest.mark.slow
def test_random_mask_identical_on_two_gloo_ranks() -> None:
    shape, p, seed = (64, 33), 0.5, 1234
    results = run_distributed(_build_on_rank, 2, shape, p, seed)
    local = bytes(RandomMask(shape, p, seed=seed).mask.to(torch.uint8).flatten().tolist())
    assert results[0] == results[1] == local


def test_expected_buffers_say_what_the_masks_must_hold() -> None:
    causal = CausalMask(4)
    causal.mask(9)  # regrown
    (name, want), = causal.expected_buffers().items()
    assert name == "mask" and torch.equal(want, causal.mask(9))
    rand = RandomMask((5, 7), 0.3, seed=2).resample_(11)
    assert torch.equal(rand.expected_buffers()["mask"], rand.mask)
    with torch.no_grad():
        rand.seed.fill_(12)  # the seed changed behind the mask's back
    assert not torch.equal(rand.expected_buffers()["mask"], rand.mask)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(statplug.masks, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
