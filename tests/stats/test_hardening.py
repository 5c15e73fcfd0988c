"""Issue 13, "Exactness and state": each bad input, value or saved state, and its neighbours.

Every failure is one clear ``ValueError``/``TypeError`` (bad input or argument) or
``CheckpointMismatchError`` (bad saved state) naming the stat, and leaves the stat exactly as it
was; every accepted input gives the float64 answer.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from state_reference import same_bits
from torch import nn

from statplug import (
    CheckpointMismatchError,
    EMAMoments,
    RunningMinMax,
    RunningMoments,
    RunningNorm,
)
from statplug._buffers import name_modules
from statplug.encodings import RotaryEncoding, SinusoidalEncoding
from statplug.masks import CausalMask, RandomMask

STATS = (RunningMoments, EMAMoments, RunningMinMax)
POLICIES = ("raise", "skip", "propagate")


def _rel(got: torch.Tensor, want: np.ndarray) -> float:
    g = got.detach().double().reshape(-1).numpy()
    return float(np.max(np.abs(g - want) / np.abs(want)))


def _one_stat(cls: type, *args, **kw) -> nn.Module:
    """A stat inside a model, named ``enc.stat`` as statplug names it for messages."""
    model = nn.Module()
    model.enc = nn.Module()
    model.enc.stat = cls(*args, **kw)
    name_modules(model)
    return model.enc.stat


# ------------------------------------------------------------------------------ large offsets
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments])
def test_mean_1e8_std_100_float32_batch_variance_within_1e_3(cls: type, acc: torch.dtype) -> None:
    # float32 data at 1e8 are multiples of 8: a spread of 100 is representable, the kernel's
    # float32 column sum (ulp 8192 at 1e11) is not; the old code gave 54,377 for 10,028.
    x = np.random.default_rng(0).normal(1e8, 100.0, size=(1024, 3)).astype(np.float32)
    kw = {"momentum": 1.0} if cls is EMAMoments else {}
    stat = cls(3, accumulator_dtype=acc, **kw)
    stat.update(torch.from_numpy(x))
    ref = x.astype(np.float64)
    assert _rel(stat.var, ref.var(0)) < 1e-3
    assert _rel(stat.mean, ref.mean(0)) < 1e-7


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunks", [1, 300])
def test_mean_1e6_std_1_at_300k_rows_within_1e_3(acc: torch.dtype, chunks: int) -> None:
    x = np.random.default_rng(1).normal(1e6, 1.0, size=(300_000, 2)).astype(np.float32)
    stat = RunningMoments(2, accumulator_dtype=acc)
    for part in np.array_split(x, chunks):
        stat.update(torch.from_numpy(np.ascontiguousarray(part)))
    ref = x.astype(np.float64)
    # float32 accumulator: its stored mean has an ulp of 1/16 at 1e6, so each Chan merge
    # rounds m2's increments by up to that squared (measured 2e-5 in 300 chunks).
    assert _rel(stat.var, ref.var(0)) < (1e-3 if acc == torch.float32 else 1e-6)


def test_skip_policy_is_exact_at_large_offsets_too() -> None:
    x = np.random.default_rng(2).normal(1e8, 100.0, size=(1024, 3)).astype(np.float32)
    stat = RunningMoments(3, nan_policy="skip", accumulator_dtype=torch.float64)
    stat.update(torch.from_numpy(x))
    assert _rel(stat.var, x.astype(np.float64).var(0)) < 1e-6


def test_ordinary_data_keeps_the_one_kernel_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ordinary float32 data take one kernel call per update; only data far from 0 against
    their spread take a second pass (the refinement is counted, not timed)."""
    import statplug.stats.merge as merge

    calls: list[torch.dtype] = []
    real = merge._cpu_stats

    def counted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(x.dtype)
        return real(x)

    monkeypatch.setattr(merge, "_cpu_stats", counted)
    rng = np.random.default_rng(3)
    shapes = [((256, 64), 100.0, 3.0), ((4096, 512), 0.0, 1.0), ((4096, 64), 1e4, 1.0)]
    for shape, loc, scale in shapes:
        x = torch.from_numpy(rng.normal(loc, scale, size=shape).astype(np.float32))
        x[:, 0] = 1.0  # an exactly constant column (a bias feature) is no reason to refine
        for stat in (RunningMoments(shape[1]), EMAMoments(shape[1]), RunningNorm(shape[1])):
            stat.update(x)
    assert calls == [torch.float32] * 9  # mean 1e4, std 1 included: one pass
    far = torch.from_numpy(rng.normal(1e8, 100.0, size=(16384, 3)).astype(np.float32))
    RunningMoments(3).update(far)
    assert calls[9:] == [torch.float32, torch.float32]  # refined about the kernel's mean


# ------------------------------------------------------------------------------ huge values
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments, RunningNorm])
def test_constant_2e38_gives_finite_exact_results(cls: type, acc: torch.dtype) -> None:
    stat = cls(2, accumulator_dtype=acc)
    x = torch.full((10, 2), 2e38)
    stat.update(x)
    assert torch.equal(stat.mean.double(), x[0].double())
    assert torch.equal(stat.var, torch.zeros(2, dtype=acc))


def test_spread_too_large_for_a_float32_accumulator_is_a_clear_error() -> None:
    x = torch.tensor([[3e38], [-3e38]])
    stat = _one_stat(RunningMoments, 1, accumulator_dtype=torch.float32)
    stat.update(torch.tensor([[1.0], [2.0]]))
    before = copy.deepcopy(stat)
    with pytest.raises(ValueError, match=r"enc\.stat.*too large.*float64"):
        stat.update(x)
    assert same_bits(stat, before)
    wide = RunningMoments(1, accumulator_dtype=torch.float64)
    wide.update(x)
    assert wide.var.item() == pytest.approx(x.double().var(unbiased=False).item(), rel=1e-12)


# ------------------------------------------------------------------------------ loading
def _filled(cls: type, **kw) -> nn.Module:
    stat = cls(3, **kw)
    stat.update(torch.randn(20, 3) * 2 + 1)
    return stat


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("cls", STATS)
def test_a_wrongly_shaped_key_leaves_the_stat_exactly_unchanged(cls: type, strict: bool) -> None:
    stat = _filled(cls)
    before = copy.deepcopy(stat)
    sd = _filled(cls).state_dict()
    sd["count"] = torch.tensor(100)
    name = "m2" if cls is RunningMoments else "var" if cls is EMAMoments else "max"
    sd[name] = torch.zeros(4)  # the last key: torch would have loaded the others first
    with pytest.raises(CheckpointMismatchError, match=f"'{name}'.*not loaded"):
        stat.load_state_dict(sd, strict=strict)
    assert same_bits(stat, before)


def _bad_states() -> list[tuple[type, str, object, str]]:
    return [
        (RunningMoments, "count", torch.tensor(-5), "non-negative whole"),
        (RunningMoments, "count", torch.tensor(2.5), "non-negative whole"),
        (RunningMoments, "count", torch.tensor(float("nan")), "non-negative whole"),
        (RunningMoments, "count", 7, "must be a tensor"),
        (RunningMoments, "n_skipped", torch.tensor(-1), "non-negative whole"),
        (RunningMoments, "m2", -torch.ones(3), ">= 0"),
        (RunningMoments, "mean", torch.zeros(3, dtype=torch.complex64), "complex"),
        (RunningMoments, "frozen_flag", torch.tensor(1), "torch.bool"),
        (EMAMoments, "weight", torch.tensor(1.5), r"\[0, 1\]"),
        (EMAMoments, "var", -torch.ones(3), ">= 0"),
        (RunningMinMax, "min", torch.full((3,), 9.0), "must not exceed"),
        (RunningMinMax, "count", torch.tensor(-1), "non-negative whole"),
    ]


@pytest.mark.parametrize(("cls", "key", "value", "match"), _bad_states())
def test_invalid_saved_values_are_refused_naming_stat_and_key(cls, key, value, match) -> None:
    stat = _one_stat(cls, 3)
    stat.update(torch.randn(8, 3))
    before = copy.deepcopy(stat)
    sd = stat.state_dict()
    sd[key] = value
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match=rf"enc\.stat: .*'{key}'.*{match}"):
            stat.load_state_dict(sd, strict=strict)
        assert same_bits(stat, before)


@pytest.mark.parametrize("cls", STATS)
def test_an_empty_state_must_be_empty(cls: type) -> None:
    sd = _filled(cls).state_dict()
    sd["count"] = torch.tensor(0)
    stat = cls(3)
    with pytest.raises(CheckpointMismatchError, match="empty state"):
        stat.load_state_dict(sd)
    assert same_bits(stat, cls(3))


@pytest.mark.parametrize(("saved", "loaded"), [
    (RunningMinMax, RunningMoments), (EMAMoments, RunningMoments), (RunningMoments, EMAMoments),
    (RunningMoments, RunningMinMax),
])
def test_a_stat_that_changed_class_under_the_same_name_is_refused(saved, loaded) -> None:
    old, new = nn.Module(), nn.Module()
    old.stat, new.stat = _filled(saved), _filled(loaded)
    before = copy.deepcopy(new.stat)
    with pytest.raises(CheckpointMismatchError, match=r"stat\.\w+"):
        new.load_state_dict(old.state_dict(), strict=False)
    assert same_bits(new.stat, before)


def test_a_lost_key_with_strict_false_is_refused_but_an_absent_stat_is_left_alone() -> None:
    model = nn.Module()
    model.a, model.b = _filled(RunningMoments), _filled(RunningMoments)
    sd = _filled(RunningMoments).state_dict()
    partial = {f"a.{k}": v for k, v in sd.items() if k != "mean"}
    before = copy.deepcopy(model)
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*'a\.mean'"):
        model.load_state_dict(partial, strict=False)
    assert same_bits(model.a, before.a)
    # No key of `b` at all (a weights-only checkpoint): nothing to load, no error.
    result = model.load_state_dict({f"a.{k}": v for k, v in sd.items()}, strict=False)
    assert "b.count" in result.missing_keys and same_bits(model.b, before.b)


def test_a_state_saved_by_a_newer_version_is_refused() -> None:
    stat = _filled(RunningMoments)
    sd = stat.state_dict()
    sd._metadata[""]["version"] = RunningMoments._version + 1  # type: ignore[attr-defined]
    with pytest.raises(CheckpointMismatchError, match="newer"):
        RunningMoments(3).load_state_dict(sd)


@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments, RunningMinMax])
def test_the_saved_version_decides_the_migration(cls: type) -> None:
    """Without a version (torch's metadata dropped) the bookkeeping buffers may be missing and
    load as their defaults; a version-1 state always holds them, so one without is refused."""
    src = _filled(cls)
    src.n_skipped.fill_(2)
    sd = src.state_dict()
    for key in ("n_skipped", "frozen_flag"):
        del sd[key]
    loaded = cls(3)
    loaded.load_state_dict(dict(sd))  # a plain dict: no metadata, no version
    assert int(loaded.n_skipped) == 0 and not loaded.frozen
    assert torch.equal(loaded.count, src.count)
    stat = cls(3)
    before = copy.deepcopy(stat)
    with pytest.raises(CheckpointMismatchError, match="missing key"):
        stat.load_state_dict(sd)  # version 1 in its metadata
    assert same_bits(stat, before)


def test_a_float64_state_assigned_into_a_float32_stat_keeps_the_accumulator_dtype() -> None:
    src = _filled(RunningMoments, accumulator_dtype=torch.float64)
    stat = RunningMoments(3, accumulator_dtype=torch.float32)
    stat.load_state_dict(src.state_dict(), assign=True)
    assert stat.mean.dtype == stat.m2.dtype == torch.float32


# ------------------------------------------------------------------------------ input types
def _bad_inputs() -> list[tuple[str, object, type]]:
    return [
        ("complex", torch.randn(4, 3, dtype=torch.complex64), TypeError),
        ("bool", torch.ones(4, 3, dtype=torch.bool), TypeError),
        ("list", [[1.0, 2.0, 3.0]], TypeError),
        ("numpy", np.ones((4, 3)), TypeError),
        ("meta", torch.empty(4, 3, device="meta"), ValueError),
        ("sparse", torch.eye(3).to_sparse(), TypeError),
        ("shape", torch.ones(4, 2), ValueError),
    ]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cls", [*STATS, RunningNorm])
@pytest.mark.parametrize(("what", "x", "error"), _bad_inputs())
def test_bad_input_is_one_clear_error_and_no_state_change(cls, policy, what, x, error) -> None:
    stat = _one_stat(cls, 3, nan_policy=policy)
    stat.update(torch.randn(5, 3))
    before = copy.deepcopy(stat)
    with pytest.raises(error, match=r"enc\.stat") as err:
        stat.update(x) if cls is not RunningNorm else stat.train()(x)
    assert "\n" not in str(err.value)
    assert same_bits(stat, before)


# ------------------------------------------------------------------------------ constructors
@pytest.mark.parametrize(("build", "name"), [
    (lambda: RunningNorm(3, eps=float("nan")), "eps"),
    (lambda: RunningNorm(3, eps=float("inf")), "eps"),
    (lambda: RunningNorm(3, eps="x"), "eps"),
    (lambda: RunningNorm(3, eps=None), "eps"),
    (lambda: RunningNorm(3, eps=-1.0), "eps"),
    (lambda: RunningNorm(3, clip=float("nan")), "clip"),
    (lambda: RunningNorm(3, clip=0.0), "clip"),
    (lambda: RunningNorm(3, clip="2"), "clip"),
    (lambda: RunningNorm(3, clip=True), "clip"),
    (lambda: EMAMoments(3, momentum="0.1"), "momentum"),
    (lambda: EMAMoments(3, momentum=None), "momentum"),
    (lambda: EMAMoments(3, momentum=float("nan")), "momentum"),
    (lambda: EMAMoments(3, momentum=1.5), "momentum"),
    (lambda: RunningMoments(True), "shape"),
    (lambda: RunningMoments((3, True)), "shape"),
    (lambda: RunningMoments(3.0), "shape"),
    (lambda: RunningMoments(3, accumulator_dtype="float32"), "accumulator_dtype"),
    (lambda: RunningMoments(3, nan_policy=None), "nan_policy"),
    (lambda: RunningMinMax(3, device="nowhere"), "device"),
    (lambda: RunningNorm.fixed([0.0, float("nan")], [1.0, 1.0]), "mean"),
    (lambda: RunningNorm.fixed([0.0, 1.0], [1.0, float("inf")]), "std"),
    (lambda: RunningNorm.fixed([0.0, 1.0], [1.0, 0.0]), "std"),
    (lambda: RunningNorm.fixed(["a", "b"], [1.0, 1.0]), "mean"),
    (lambda: RunningNorm.fixed([0.0], [1e-30], accumulator_dtype=torch.float32), "representable"),
    (lambda: RunningNorm.fixed([0.0], [1.0], eps=float("nan")), "eps"),
])
def test_bad_constructor_values_are_one_line_value_errors(build, name) -> None:
    with pytest.raises(ValueError, match=name) as err:
        build()
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ meta device
def test_fixed_normaliser_on_the_meta_device_and_across_reset_parameters() -> None:
    with torch.device("meta"):
        norm = RunningNorm.fixed([1.0, 2.0], [3.0, 4.0])
    assert norm.frozen and norm.mean.device.type == "meta"
    norm.to_empty(device="cpu")
    norm.reset_parameters()
    x = torch.tensor([[4.0, 6.0]])
    torch.testing.assert_close(norm(x), torch.tensor([[1.0, 1.0]]))
    assert norm.frozen and norm.count.item() == 2
    cpu = RunningNorm.fixed([1.0, 2.0], [3.0, 4.0])
    cpu.reset_parameters()  # a fixed normaliser stays fixed, not empty and unfrozen
    assert cpu.frozen and torch.equal(cpu(x), norm(x))
    plain = RunningNorm(2)
    plain.update(torch.randn(5, 2))
    plain.reset_parameters()
    assert plain.count.item() == 0 and not plain.frozen


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = RunningNorm(4)
        self.stats = nn.ModuleList([RunningMoments(4), EMAMoments(4), RunningMinMax(4)])
        self.causal = CausalMask(6)
        self.drop = RandomMask((4,), 0.5, seed=3)
        self.sin = SinusoidalEncoding(4, max_len=8)
        self.rope = RotaryEncoding(4, max_len=8)


def test_assign_load_into_a_meta_built_model_materialises_every_buffer() -> None:
    src = _Net()
    x = torch.randn(9, 4)
    src.norm(x)
    for s in src.stats:
        s.update(x)
    with torch.device("meta"):
        net = _Net()
    net.load_state_dict(src.state_dict(), assign=True)
    for name, buf in net.named_buffers():
        assert buf.device.type == "cpu", name  # hidden agreed state and derived tables too
    assert torch.equal(net.causal.mask(6), src.causal.mask(6))
    assert torch.equal(net.sin.pe, src.sin.pe)
    for name in ("inv_freq", "cos_cached", "sin_cached"):
        assert torch.equal(getattr(net.rope, name), getattr(src.rope, name))
    y = torch.randn(5, 4)
    for a, b in zip([net.norm, *net.stats], [src.norm, *src.stats], strict=True):
        a.update(y)
        b.update(y)
        assert same_bits(a, b)


def test_a_load_after_to_empty_regenerates_derived_buffers() -> None:
    src = _Net()
    with torch.device("meta"):
        net = _Net()
    net.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialised memory may hold
        net.causal._buffers["mask"].fill_(False)
        for t in (net.sin.pe, net.rope.cos_cached, net.rope.sin_cached, net.rope.inv_freq):
            t.fill_(float("nan"))
    net.load_state_dict(src.state_dict())
    assert torch.equal(net.causal.mask(6), src.causal.mask(6))
    assert torch.equal(net.sin.pe, src.sin.pe)
    assert torch.equal(net.rope.cos_cached, src.rope.cos_cached)
    assert torch.equal(net.rope.inv_freq, src.rope.inv_freq)


@pytest.mark.parametrize("host", [True, False], ids=["cpu-count-read", "device-path"])
def test_norm_called_twice_before_backward(host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A normaliser used twice in one graph (weight sharing) backpropagates through both calls,
    each with the statistics it normalised by -- the second update must not invalidate what
    autograd saved from the first."""
    if not host:
        for module in ("statplug.stats.holder", "statplug.stats.norm", "statplug.stats.merge"):
            monkeypatch.setattr(f"{module}.host_reads_free", lambda t: False)
    torch.manual_seed(0)
    norm = RunningNorm(4)
    x1 = (torch.randn(8, 4) * 3 + 1).requires_grad_()
    x2 = (torch.randn(8, 4) * 2 - 1).requires_grad_()
    w1, w2 = torch.randn(8, 4), torch.randn(8, 4)
    ref = RunningNorm(4)
    stats = []
    for x in (x1, x2):
        ref.update(x.detach())
        stats.append((ref.mean.clone(), ref.var.clone()))
    ((norm(x1) * w1).sum() + (norm(x2) * w2).sum()).backward()
    for x, w, (_, var) in zip((x1, x2), (w1, w2), stats, strict=True):
        expected = (w / torch.sqrt(var + norm.eps)).float()  # d/dx of (x - mean) / sqrt(var + eps)
        assert x.grad is not None
        torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_norm_under_vmap_ensembling_matches_each_model(mode: str) -> None:
    """The torch.func ensembling pattern (stack_module_state + vmap(functional_call)) works as
    for nn.BatchNorm1d: the CPU count read must not run on vmap's batched tensors."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    models = [RunningNorm(4, nan_policy="propagate") for _ in range(3)]
    for m in models:
        m(torch.randn(50, 4) * 2 + 1)
        getattr(m, mode)()
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = getattr(copy.deepcopy(models[0]).to("meta"), mode)()
    x = torch.randn(8, 4)
    out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))(
        params, buffers, x
    )
    expected = torch.stack([copy.deepcopy(m)(x) for m in models])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_jit_trace_counts_every_update() -> None:
    """A traced update must not bake the count read at trace time into the graph."""
    stat = RunningMoments(3, nan_policy="propagate").train()
    xs = [torch.randn(4, 3) + i for i in range(4)]
    traced = torch.jit.trace(stat, (xs[0],), check_trace=False)
    for x in xs[1:]:
        traced(x)
    data = torch.cat(xs).double()
    assert int(stat.count) == len(data)
    torch.testing.assert_close(stat.mean.double(), data.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stat.var.double(), data.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


def test_compiled_skip_norm_is_the_identity_until_two_valid_rows() -> None:
    """With nan_policy="skip" a batch of two rows may hold one valid sample: compiled, the
    normaliser must still return its input (as eager does), not divide by sqrt(eps)."""
    x = torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])
    eager = RunningNorm(2, nan_policy="skip")
    compiled_norm = RunningNorm(2, nan_policy="skip")
    compiled = torch.compile(compiled_norm, backend="aot_eager", fullgraph=True)
    y_eager, y_compiled = eager(x), compiled(x)
    assert int(compiled_norm.count) == int(eager.count) == 1
    torch.testing.assert_close(y_compiled, x, equal_nan=True)
    torch.testing.assert_close(y_eager, x, equal_nan=True)
