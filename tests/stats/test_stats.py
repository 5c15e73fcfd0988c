"""Stats against float64 numpy references: exactness, merging, dtypes, nan policy, persistence."""

from __future__ import annotations

import doctest
import io

import numpy as np
import pytest
import torch
from torch import nn

import statplug._buffers
import statplug.stats.minmax
import statplug.stats.moments
import statplug.stats.norm
from statplug import EMAMoments, RunningMinMax, RunningMoments, RunningNorm

UNEVEN = [1, 7, 256, 3, 1000, 4096, 2]


def _batches(rng: np.random.Generator, sizes, shape, loc=0.0, scale=1.0):
    return [rng.normal(loc, scale, size=(n, *shape)) for n in sizes]


def _rel(a: torch.Tensor, b: np.ndarray) -> float:
    a64 = a.detach().double().numpy()
    return float(np.max(np.abs(a64 - b) / np.maximum(np.abs(b), 1e-300)))


@pytest.mark.parametrize("shape", [(5,), (3, 4)])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_running_moments_matches_float64_reference_uneven_batches(shape, acc):
    rng = np.random.default_rng(0)
    batches = _batches(rng, UNEVEN, shape, loc=3.0, scale=2.0)
    stat = RunningMoments(shape, accumulator_dtype=acc)
    for b in batches:
        stat.update(torch.from_numpy(b).float())
    data = np.concatenate([b.astype(np.float32).astype(np.float64) for b in batches])
    assert stat.count.item() == data.shape[0]
    assert stat.count.dtype == torch.int64
    assert stat.mean.dtype == acc
    assert _rel(stat.mean, data.mean(0)) < 1e-6
    assert _rel(stat.var, data.var(0)) < 1e-5
    assert _rel(stat.sample_var, data.var(0, ddof=1)) < 1e-5
    assert _rel(stat.std, data.std(0)) < 1e-5


@pytest.mark.parametrize(
    ("rows", "features", "chunks"),
    [(256, 64, 4), (4096, 64, 4), (65536, 64, 4), (4096, 512, 1), (100001, 3, 1),
     (65537, 3, 2), (8192, 2048, 1)],
)
@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments])
def test_large_offset_float32_variance_within_1e_3(rows, features, chunks, cls):
    """Mean 1e4, std 1 in float32, including odd row counts and wide batches."""
    rng = np.random.default_rng(1)
    data = rng.normal(1e4, 1.0, size=(rows, features)).astype(np.float32)
    if cls is EMAMoments:
        stat = EMAMoments(features, momentum=1.0)  # one step: the batch's own moments
        chunks = 1
    else:
        stat = RunningMoments(features)
    for chunk in np.array_split(data, chunks):
        stat.update(torch.from_numpy(np.ascontiguousarray(chunk)))
    ref = data.astype(np.float64)
    assert _rel(stat.var, ref.var(0)) < 1e-3
    assert _rel(stat.mean, ref.mean(0)) < 1e-6


N_SINGLE = 60_000


def test_many_batches_of_one_keep_float_precision():
    # The saved state is the whole state (no hidden float64 working copy), so a float32
    # accumulator rounds its mean once per update, as BatchNorm's running mean does: a random
    # walk of ~sqrt(updates) half-ulps, and its m2 drops increments below half an ulp of a sum
    # that grows with the count (4e-4 after a million updates). float64 keeps 1e-6. 60,000
    # updates keep the suite's time (a million took 160 s of it) and still show both effects.
    rng = np.random.default_rng(2)
    data = rng.normal(5.0, 1.0, size=(N_SINGLE, 1)).astype(np.float32)
    stat64 = RunningMoments(1, accumulator_dtype=torch.float64)
    stat32 = RunningMoments(1)
    xs = torch.from_numpy(data)
    for i in range(xs.shape[0]):
        stat64.update(xs[i])
        stat32.update(xs[i])
    ref = data.astype(np.float64)
    for stat in (stat64, stat32):
        assert stat.count.item() == N_SINGLE
    assert _rel(stat64.mean, ref.mean(0)) < 1e-6
    assert _rel(stat64.var, ref.var(0)) < 1e-5
    assert _rel(stat32.mean, ref.mean(0)) < 1e-4
    assert _rel(stat32.var, ref.var(0)) < 1e-3  # DESIGN's float32 bound


def test_reading_between_updates_does_not_change_the_result():
    rng = np.random.default_rng(3)
    batches = _batches(rng, UNEVEN, (4,), loc=100.0)
    a, b = RunningMoments(4), RunningMoments(4)
    for x in batches:
        a.update(torch.from_numpy(x).float())
        b.update(torch.from_numpy(x).float())
        _ = b.mean, b.var  # materialise every step
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(a.var, b.var, rtol=1e-6, atol=0)


def test_minmax_exact_uneven():
    rng = np.random.default_rng(4)
    batches = _batches(rng, UNEVEN, (3,))
    stat = RunningMinMax(3)
    for b in batches:
        stat.update(torch.from_numpy(b))
    data = np.concatenate(batches).astype(np.float32)
    assert stat.count.item() == data.shape[0]
    np.testing.assert_array_equal(stat.min.numpy(), data.min(0))
    np.testing.assert_array_equal(stat.max.numpy(), data.max(0))


def _ema_reference(batches, m):
    """Exponentially weighted mean/var with weight (1-m)**age per batch, normalised."""
    ws = [m * (1 - m) ** (len(batches) - 1 - i) for i in range(len(batches))]
    rows_w = np.concatenate([np.full(len(b), w / len(b)) for b, w in zip(batches, ws, strict=True)])
    data = np.concatenate(batches)
    mean = (rows_w[:, None] * data).sum(0) / rows_w.sum()
    var = (rows_w[:, None] * (data - mean) ** 2).sum(0) / rows_w.sum()
    return mean, var


def test_ema_matches_float64_reference():
    rng = np.random.default_rng(5)
    batches = _batches(rng, [8, 3, 20, 5, 64, 1, 9], (3,), loc=2.0)
    stat = EMAMoments(3, momentum=0.3, accumulator_dtype=torch.float64)
    for b in batches:
        stat.update(torch.from_numpy(b))
    mean, var = _ema_reference(batches, 0.3)
    assert _rel(stat.mean, mean) < 1e-10
    assert _rel(stat.var, var) < 1e-10
    assert stat.count.item() == sum(len(b) for b in batches)


@pytest.mark.parametrize("cls", [RunningMoments, RunningMinMax])
def test_merge_of_disjoint_splits_equals_union(cls):
    rng = np.random.default_rng(6)
    batches = _batches(rng, UNEVEN, (4,), loc=-7.0, scale=3.0)
    whole = cls(4, accumulator_dtype=torch.float64)
    parts = [cls(4, accumulator_dtype=torch.float64) for _ in range(3)]  # parts[2] stays empty
    for i, b in enumerate(batches):
        whole.update(torch.from_numpy(b))
        parts[i % 2].update(torch.from_numpy(b))
    merged = cls(4, accumulator_dtype=torch.float64)
    for p in parts:
        merged.merge_(p)
    empty_first = cls(4, accumulator_dtype=torch.float64).merge_(parts[0]).merge_(parts[1])
    data = np.concatenate(batches)
    for m in (merged, empty_first):
        assert m.count.item() == whole.count.item() == len(data)
        if cls is RunningMoments:
            assert _rel(m.mean, data.mean(0)) < 1e-12
            assert _rel(m.var, data.var(0)) < 1e-12
        else:
            np.testing.assert_array_equal(m.min.numpy(), data.min(0))
            np.testing.assert_array_equal(m.max.numpy(), data.max(0))


def test_merge_rejects_other_kind_or_shape():
    with pytest.raises(ValueError, match="expected a RunningMoments of shape"):
        RunningMoments(3).merge_(RunningMoments(4))
    with pytest.raises(ValueError, match="RunningMinMax"):
        RunningMoments(3).merge_(RunningMinMax(3))  # type: ignore[arg-type]


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.moments = RunningMoments(4)
        self.ema = EMAMoments(4)
        self.minmax = RunningMinMax(4)
        self.norm = RunningNorm(4)


@pytest.mark.parametrize(
    "convert", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()]
)
def test_accumulator_dtype_survives_model_conversions(convert):
    model = convert(_Model())
    for stat in (model.moments, model.ema, model.minmax, model.norm.moments):
        for name in stat.state_names:
            buf = stat._buffers[name]
            if buf.is_floating_point():
                assert buf.dtype == stat.accumulator_dtype, (type(stat).__name__, name, buf.dtype)
        assert stat.count.dtype == torch.int64
    # float64 for the cumulative moments, float32 for EMA and min/max (DESIGN.md §1)
    assert model.moments.mean.dtype == model.norm.moments.mean.dtype == torch.float64
    assert model.ema.mean.dtype == model.minmax.min.dtype == torch.float32
    assert model.lin.weight.dtype != torch.float32  # the conversion did happen
    model.moments.update(torch.randn(8, 4).to(model.lin.weight.dtype))
    assert model.moments.mean.dtype == torch.float64


def test_count_exact_past_2_pow_24():
    stat = RunningMoments(1)
    stat.update(torch.zeros(2**24 + 5, 1))
    assert stat.count.item() == 2**24 + 5
    stat.update(torch.ones(1, 1))
    assert stat.count.item() == 2**24 + 6
    stat_bf = _Model().to(torch.bfloat16).minmax
    stat_bf.update(torch.zeros(2**24 + 5, 4, dtype=torch.bfloat16))
    assert stat_bf.count.item() == 2**24 + 5


@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments, RunningMinMax])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_policy_raise_names_stat_and_leaves_it_unchanged(cls, bad):
    model = nn.Module()
    model.enc = nn.Module()
    model.enc.stat = cls(3)
    from statplug._buffers import name_modules

    name_modules(model)
    stat = model.enc.stat
    stat.update(torch.randn(10, 3))
    before = {k: v.clone() for k, v in stat.state_dict().items()}
    x = torch.randn(5, 3)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"enc\.stat"):
        stat.update(x)
    after = stat.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, equal_nan=True)


@pytest.mark.parametrize("cls", [RunningMoments, RunningMinMax, EMAMoments])
def test_nan_policy_skip_drops_rows_and_counts_them(cls):
    rng = np.random.default_rng(7)
    data = rng.normal(size=(50, 3))
    bad_rows = [3, 17, 40]
    dirty = data.copy()
    dirty[3, 0] = np.nan
    dirty[17, 2] = np.inf
    dirty[40, 1] = -np.inf
    stat = cls(3, nan_policy="skip", accumulator_dtype=torch.float64)
    ref = cls(3, accumulator_dtype=torch.float64)
    stat.update(torch.from_numpy(dirty))
    ref.update(torch.from_numpy(np.delete(data, bad_rows, axis=0)))
    assert stat.n_skipped.item() == 3
    assert stat.count.item() == 47
    for name in ref.state_names:
        if name in ("n_skipped",):
            continue
        torch.testing.assert_close(stat.state_dict()[name], ref.state_dict()[name])


def test_nan_policy_propagate_keeps_nan():
    stat = RunningMoments(2, nan_policy="propagate")
    stat.update(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    assert torch.isnan(stat.mean[1]) and stat.mean[0].item() == 1.5


def test_wrong_feature_shape_names_expected_and_received():
    stat = RunningMoments((3, 4))
    with pytest.raises(ValueError, match=r"\(3, 4\).*got shape \(2, 4, 3\)"):
        stat.update(torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="RunningMinMax"):
        RunningMinMax(3).update(torch.zeros(2, 5))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="accumulator_dtype"):
        RunningMoments(3, accumulator_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="nan_policy"):
        RunningMoments(3, nan_policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum"):
        EMAMoments(3, momentum=0.0)
    with pytest.raises(ValueError, match="shape"):
        RunningMoments(0)


def _filled_model() -> _Model:
    model = _Model()
    for _ in range(3):
        x = torch.randn(16, 4) * 3 + 1
        model.moments.update(x)
        model.ema.update(x)
        model.minmax.update(x)
        model.norm(x)
    model.norm.freeze()
    return model


def _assert_same_stats(a: _Model, b: _Model) -> None:
    for name in ("moments", "ema", "minmax"):
        sa, sb = getattr(a, name), getattr(b, name)
        for key in sa.state_names:
            torch.testing.assert_close(sa.state_dict()[key], sb.state_dict()[key], rtol=0, atol=0)
    assert b.norm.frozen


def test_state_dict_round_trip_and_weights_only_file():
    model = _filled_model()
    fresh = _Model()
    fresh.load_state_dict(model.state_dict())
    _assert_same_stats(model, fresh)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = _Model()
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    _assert_same_stats(model, loaded)
    # A loaded stat keeps accumulating exactly.
    x = torch.randn(9, 4)
    model.moments.update(x)
    loaded.moments.update(x)
    torch.testing.assert_close(model.moments.var, loaded.moments.var)


def test_no_state_is_a_parameter_or_requires_grad():
    model = _filled_model()
    param_ids = {id(p) for p in model.parameters()}
    stat_keys = {k for k in model.state_dict() if not k.startswith("lin.")}
    assert stat_keys
    for name, buf in model.named_buffers():
        assert id(buf) not in param_ids
        assert not buf.requires_grad, name
    assert all(n.startswith("lin.") for n, _ in model.named_parameters())
    # An update with an input that requires grad builds no graph.
    x = torch.randn(4, 4, requires_grad=True)
    model.moments.update(x * 2)
    assert not model.moments.mean.requires_grad


def test_freeze_makes_update_a_noop_and_is_saved():
    stat = RunningMoments(2)
    stat.update(torch.ones(3, 2))
    stat.freeze()
    stat.update(torch.zeros(3, 2))
    assert stat.count.item() == 3
    other = RunningMoments(2)
    other.load_state_dict(stat.state_dict())
    assert other.frozen
    other.update(torch.zeros(3, 2))
    assert other.count.item() == 3
    other.unfreeze().update(torch.zeros(3, 2))
    assert other.count.item() == 6


def test_reset_empties():
    stat = RunningMoments(2)
    stat.update(torch.randn(10, 2) + 5)
    stat.reset()
    assert stat.count.item() == 0
    stat.update(torch.tensor([[1.0, 2.0]]))
    assert stat.mean.tolist() == [1.0, 2.0]


def test_running_norm_train_eval_clip_inverse():
    torch.manual_seed(0)
    norm = RunningNorm(3, clip=2.0)
    x = torch.randn(1, 3)
    torch.testing.assert_close(norm(x), x)  # before two samples: identity
    data = torch.randn(500, 3) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([0.0, 5.0, -3.0])
    y = norm(data)
    seen = torch.cat([x, data]).double()  # the first sample was counted too
    ref = data.double()
    expected = ((ref - seen.mean(0)) / torch.sqrt(seen.var(0, unbiased=False) + 1e-8)).clamp(-2, 2)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    norm.eval()
    n_before = norm.count.item()
    z = norm(data[:10])
    assert norm.count.item() == n_before
    unclipped = RunningNorm(3)
    unclipped.load_state_dict(norm.state_dict())
    unclipped.eval()
    back = unclipped.inverse(unclipped(data[:10]))
    torch.testing.assert_close(back, data[:10], rtol=1e-5, atol=1e-4)
    assert z.abs().max() <= 2.0
    half = norm(data[:4].half())
    assert half.dtype == torch.float16


def test_running_norm_fixed():
    norm = RunningNorm.fixed([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    x = torch.rand(2, 3)
    expected = (x - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(norm(x), expected)
    assert norm.frozen
    norm.train()(torch.rand(5, 3))
    assert norm.count.item() == 2
    reloaded = RunningNorm(3)
    reloaded.load_state_dict(norm.state_dict())
    torch.testing.assert_close(reloaded(x), expected)


def test_docstring_examples_run():
    mods = (statplug.stats.moments, statplug.stats.minmax, statplug.stats.norm, statplug._buffers)
    for mod in mods:
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, mod.__name__


def test_meta_device_then_to_empty_and_reset_parameters_gives_empty_stats():
    with torch.device("meta"):
        model = _Model()
    model.to_empty(device="cpu")
    for mod in model.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    x = torch.randn(6, 4)
    model.moments.update(x)
    model.minmax.update(x)
    assert model.moments.count.item() == 6
    torch.testing.assert_close(model.moments.mean, x.double().mean(0))
    torch.testing.assert_close(model.minmax.max, x.max(0).values)
    assert not model.norm.frozen


def test_string_shape_is_rejected():
    with pytest.raises(ValueError, match="`shape` must be an int or a tuple"):
        RunningMoments("12")  # type: ignore[arg-type]


def test_running_norm_follows_the_stat_rules():
    a, b = RunningNorm(2), RunningNorm(2)
    xa, xb = torch.randn(10, 2) + 3, torch.randn(7, 2) - 1
    a.update(xa)
    b.update(xb)
    a.merge_(b)
    both = torch.cat([xa, xb]).double()
    torch.testing.assert_close(a.mean.double(), both.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.sample_var.double(), both.var(0), rtol=1e-5, atol=1e-6)
    assert a.n_skipped.item() == 0
    with pytest.raises(ValueError, match=r"RunningNorm\.moments"):
        RunningNorm(3)(torch.randn(4, 5))
    a.reset()
    assert a.count.item() == 0


def test_running_norm_integer_input_is_not_truncated():
    norm = RunningNorm(2)
    y = norm(torch.tensor([[0, 10], [10, 0], [5, 5]]))
    assert y.dtype == torch.float64  # integer input comes back in the accumulator dtype
    torch.testing.assert_close(y[2], torch.zeros(2, dtype=torch.float64))
    assert y[0, 0].item() < -1.0


def test_running_norm_fixed_keeps_small_std_exact():
    norm = RunningNorm.fixed([1e4], [1e-3])
    f64 = torch.float64
    torch.testing.assert_close(norm.std, torch.tensor([1e-3], dtype=f64), rtol=1e-6, atol=0)
    torch.testing.assert_close(norm.mean, torch.tensor([1e4], dtype=torch.float64))


@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments, RunningMinMax])
def test_settle_equals_a_save_and_reload(cls):
    a, b = cls(3), cls(3)
    for _ in range(5):  # small batches leave pending work behind on the host
        x = torch.randn(7, 3) * 5 + 1e3
        a.update(x)
        b.update(x)
    a.settle_()
    b.load_state_dict(b.state_dict())
    for name, buf in b.named_buffers():
        torch.testing.assert_close(dict(a.named_buffers())[name], buf, rtol=0, atol=0)
    y = torch.randn(9, 3)
    a.update(y)
    b.update(y)
    for key, value in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [RunningMoments, EMAMoments, RunningMinMax])
def test_summarize_state_reads_a_saved_state_through_its_own_class(cls):
    stat = cls((2, 3))
    stat.update(torch.randn(40, 2, 3) * 2 + 5)
    summary = cls.summarize_state(dict(stat.state_dict()))
    assert summary is not None
    assert (summary.kind, summary.shape, summary.count) == (cls.__name__, (2, 3), 40)
    assert set(summary.keys) == set(stat.state_dict())
    for name, values in summary.features.items():
        torch.testing.assert_close(values, getattr(stat, name).double().reshape(-1))
    others = [c for c in (RunningMoments, EMAMoments, RunningMinMax) if c is not cls]
    assert all(c.summarize_state(stat.state_dict()) is None for c in others)
    bad = dict(stat.state_dict(), count=torch.tensor(-1))
    assert cls.summarize_state(bad) is None


@pytest.mark.parametrize("policy", ["raise", "propagate"])
def test_min_max_fast_path_matches_the_generic_path(policy):
    x = torch.randn(64, 5)
    fast, generic = RunningMinMax(5, nan_policy=policy), RunningMinMax(5, nan_policy=policy)
    fast.update(x)
    generic.update(x.reshape(8, 8, 5))  # not 2-D: the generic path
    assert torch.equal(fast.min, generic.min) and torch.equal(fast.max, generic.max)
    assert int(fast.count) == int(generic.count) == 64
    x[3, 1] = float("nan")
    if policy == "raise":
        before = fast.state_dict()
        with pytest.raises(ValueError, match="NaN"):
            fast.update(x)
        assert all(torch.equal(v, before[k]) for k, v in fast.state_dict().items())
    else:
        fast.update(x)
        assert bool(fast.min[1].isnan())


def test_one_walker_finds_and_names_every_statplug_module():
    from statplug import Stat
    from statplug._buffers import PinnedDtypeModule, named_statplug_modules
    from statplug.masks import CausalMask

    model = nn.Module()
    model.enc = nn.Sequential(nn.Linear(3, 3), RunningNorm(3))
    model.mask = CausalMask(4)
    stats = named_statplug_modules(model, Stat)
    assert [(n, type(s).__name__) for n, s in stats] == [("enc.1.moments", "RunningMoments")]
    assert stats[0][1].stat_name == "enc.1.moments"
    every = [n for n, _ in named_statplug_modules(model, PinnedDtypeModule)]
    assert every == ["enc.1", "enc.1.moments", "mask"]
    stats[0][1].stat_name = None
    assert stats[0][1].stat_name == "RunningMoments"
