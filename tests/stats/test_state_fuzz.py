"""State fuzz (issue 12): random call sequences on every stat, checked against float64 numpy.

A seeded driver picks, for every stat class x nan policy x accumulator dtype, a random sequence of
updates (a third with a random padding mask; batches of 1 to 3000 rows, so both sides of the
1024-row kernel split; float32, float64,
bfloat16 and int32 input; 1-D and 2-D feature shapes with extra sample dims; NaN/Inf rows), reads,
``state_dict``/``load_state_dict`` into a fresh stat, raw buffer copies into a fresh stat (the way
averaging callbacks and swaps copy), ``.to(dtype)``, ``copy.deepcopy``, ``merge_``, freeze and
reset. After every step each read-out and each persistent raw buffer is compared with the float64
reference of ``state_reference.py``. A twin made by a reload at a random point gets the same
calls from then on and must stay bit-identical to the original (DESIGN §7).

A second, smaller fuzz runs the same kind of sequence with ``sync_stats`` on 2 real gloo ranks.
Each rank regenerates the other's batches from the shared seed to build the global reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from dist_utils import run_distributed  # tests/ is on sys.path via its conftest.py
from state_reference import EMARef, as_rows, check, reference_for, same_bits
from torch import nn

from statplug import EMAMoments, RunningMinMax, RunningMoments, RunningNorm, sync_stats

CLASSES = ("moments", "ema", "minmax", "norm")
POLICIES = ("raise", "skip", "propagate")
ACCS = (torch.float32, torch.float64)
SIZES = (1, 1, 2, 7, 64, 255, 1000, 1025, 3000)
INPUT_DTYPES = (torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.int32)


def make(kind: str, shape: tuple[int, ...], policy: str, acc: torch.dtype) -> nn.Module:
    kw: dict[str, Any] = {"accumulator_dtype": acc, "nan_policy": policy}
    if kind == "moments":
        return RunningMoments(shape, **kw)
    if kind == "ema":
        return EMAMoments(shape, momentum=0.3, **kw)
    if kind == "minmax":
        return RunningMinMax(shape, **kw)
    return RunningNorm(shape, **kw)


def batch(
    rng: np.random.Generator, shape: tuple[int, ...], dirty: bool, f64: bool = False
) -> torch.Tensor:
    """A random batch: random size, sample dims, dtype, location and scale; NaN/Inf if dirty."""
    n = int(rng.choice(SIZES))
    lead: tuple[int, ...] = (n,)
    if n % 2 == 0 and rng.random() < 0.3:
        lead = (2, n // 2)
    dtype = torch.float64 if f64 else INPUT_DTYPES[int(rng.integers(len(INPUT_DTYPES)))]
    loc = float(rng.uniform(-50, 50))
    scale = float(10 ** rng.uniform(-1, 1.5))
    values = rng.normal(loc, scale, size=(*lead, *shape))
    if dtype == torch.int32:
        values = np.round(values)
    if dirty:
        flat = values.reshape(-1)
        for _ in range(int(rng.integers(1, 4))):
            flat[int(rng.integers(flat.size))] = rng.choice([np.nan, np.inf, -np.inf])
        if dtype == torch.int32:
            dtype = torch.float32  # integers hold no NaN
    return torch.from_numpy(values).to(dtype)


def _update(
    stat: nn.Module, x: torch.Tensor, train_forward: bool, mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    if isinstance(stat, RunningNorm) and train_forward:
        return stat.train()(x, mask=mask)
    stat.update(x, mask=mask)
    return None


def _random_mask(rng: np.random.Generator, x: torch.Tensor, n_features: int) -> torch.Tensor | None:
    """A padding mask over ``x``'s sample dims for a third of the updates (True keeps a row)."""
    if rng.random() >= 0.3:
        return None
    samples = x.shape[: x.dim() - (1 if n_features == 3 else 2)]
    return torch.from_numpy(rng.random(samples) < 0.7)


def _check_norm_output(norm: RunningNorm, x: torch.Tensor, y: torch.Tensor) -> None:
    """A forward's output against the normalisation by the stat's own (already checked) state."""
    assert y.dtype == (x.dtype if x.is_floating_point() else norm.moments.accumulator_dtype)
    rows = as_rows(x, norm.moments.n_features)
    if int(norm.count) < 2:
        want = rows
    else:
        mean = norm.mean.double().reshape(-1).numpy()
        var = norm.var.double().reshape(-1).numpy()
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            want = (rows - mean) / np.sqrt(var + norm.eps)
    got = y.detach().double().reshape(rows.shape).numpy()
    rtol = 1e-2 if x.dtype in (torch.bfloat16, torch.float16) else 1e-4
    finite = np.isfinite(want)
    assert not np.isfinite(got[~finite]).any()
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=rtol)


def _fresh_copy(stat: nn.Module, how: str, make_fresh: Callable[[], nn.Module]) -> nn.Module:
    """``stat`` carried into another object the way ``how`` says; the copy must be the stat."""
    if how == "reload":
        other = make_fresh()
        other.load_state_dict(stat.state_dict())
    elif how == "raw_copy":
        other = make_fresh()
        # Frozen-ness is configuration mirrored in a buffer (like `training`, it is not a value
        # a buffer copy can change on the host): copies are made between stats configured alike,
        # as an averaged model (a deepcopy of the live one) and the live model are.
        if stat.frozen:
            other.freeze()
        with torch.no_grad():
            for (n, a), (m, b) in zip(stat.named_buffers(), other.named_buffers(), strict=True):
                assert n == m
                b.copy_(a)
    elif how == "deepcopy":
        other = copy.deepcopy(stat)
    else:  # a dtype conversion keeps every accumulator
        other = {"bf16": stat.to(torch.bfloat16), "half": stat.half(), "double": stat.double()}[how]
    assert same_bits(other, stat)
    return other


def _run_sequence(kind: str, policy: str, acc: torch.dtype, seed: int, steps: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (3,) if rng.random() < 0.6 else (2, 3)

    def fresh() -> nn.Module:
        return make(kind, shape, policy, acc)

    stat = fresh()
    ref = reference_for(stat)
    twin: nn.Module | None = None
    frozen = False
    # Float64 accumulators fed float64 batches only are held to float64 bounds (half the runs).
    f64_only = acc == torch.float64 and rng.random() < 0.5
    for _ in range(steps):
        op = rng.choice(
            ["update"] * 8
            + ["reload", "raw_copy", "deepcopy", "bf16", "half", "double", "merge", "merge",
               "twin", "freeze", "reset"]
        )
        if op == "update":
            x = batch(rng, shape, dirty=rng.random() < 0.2, f64=f64_only)
            forward = bool(rng.random() < 0.5)
            mask = _random_mask(rng, x, ref.n_features)
            rows = as_rows(x, ref.n_features)
            if mask is not None:  # the reference sees the kept rows only
                rows = rows[mask.reshape(-1).numpy()]
            dirty = not np.isfinite(rows).all()
            if policy == "raise" and dirty and not frozen:
                before = copy.deepcopy(stat)
                with pytest.raises(ValueError, match="NaN or Inf"):
                    _update(stat, x, forward, mask)
                assert same_bits(stat, before)  # unchanged, to the bit
                continue
            outs = [_update(s, x, forward, mask) for s in (stat, twin) if s is not None]
            if not frozen:
                ref.update(rows, policy)
            if outs[0] is not None and isinstance(stat, RunningNorm):
                check(stat, ref, acc)
                _check_norm_output(stat, x, outs[0])
        elif op in ("reload", "raw_copy", "deepcopy", "bf16", "half", "double"):
            stat = _fresh_copy(stat, op, fresh)
        elif op == "merge":
            other = fresh()
            other_ref = reference_for(other)
            for _ in range(int(rng.integers(0, 3))):
                x = batch(rng, shape, dirty=policy != "raise" and rng.random() < 0.2, f64=f64_only)
                other.update(x)
                other_ref.update(as_rows(x, ref.n_features), policy)
            for s in (stat, twin):
                if s is not None:
                    s.merge_(other)
            ref.merge(other_ref)  # type: ignore[arg-type]
        elif op == "twin" and twin is None:
            twin = _fresh_copy(stat, "reload", fresh)
        elif op == "freeze":
            frozen = not frozen
            for s in (stat, twin):
                if s is not None:
                    s.freeze() if frozen else s.unfreeze()
        elif op == "reset":
            for s in (stat, twin):
                if s is not None:
                    s.reset()
            ref = reference_for(stat)
        check(stat, ref, acc, frozen, float32_input=not f64_only)
        if twin is not None:
            assert same_bits(stat, twin), "a reloaded copy drifted from its original"


@pytest.mark.parametrize("kind", CLASSES)
def test_random_call_sequences_match_float64_numpy(kind: str) -> None:
    for i, (policy, acc) in enumerate((p, a) for p in POLICIES for a in ACCS):
        _run_sequence(kind, policy, acc, seed=1000 * CLASSES.index(kind) + i, steps=40)


# ------------------------------------------------------------------------------ 2 gloo ranks
SYNC_STEPS = 30


def _rank_batch(
    seed: int, step: int, rank: int, shape: tuple[int, ...], dirty: bool
) -> torch.Tensor:
    return batch(np.random.default_rng([seed, step, rank]), shape, dirty)


def _sync_fuzz_body(rank: int, world: int, seed: int) -> list[str]:
    """Every rank runs the same op sequence (shared rng) on its own data; after each sync every
    stat must equal the float64 reference over all ranks' data, which each rank rebuilds."""
    ops_rng = np.random.default_rng(seed)  # identical on every rank: the op sequence
    shape = (3,)
    policies = {"moments": "propagate", "ema": "skip", "minmax": "propagate", "norm": "raise"}
    # Both accumulator dtypes in one sync (a sync batches stats by class and dtype).
    accs = {"moments": torch.float32, "ema": torch.float64, "minmax": torch.float64,
            "norm": torch.float32}
    stats = {k: make(k, shape, p, accs[k]) for k, p in policies.items()}
    agreed = {k: reference_for(s) for k, s in stats.items()}  # the global state at the last sync
    # local[k][r]: what rank r's stat holds (EMA: its summary) or has added since the last sync.
    local = {k: [_since_sync(agreed[k]) for _ in range(world)] for k in stats}
    done = []
    for step in range(SYNC_STEPS):
        op = ops_rng.choice(["update"] * 4 + ["sync", "sync", "reload", "merge"])
        if op in ("update", "merge"):
            for k, s in stats.items():
                dirty = op == "update" and policies[k] != "raise" and ops_rng.random() < 0.15
                for r in range(world):
                    x = _rank_batch(seed, step, r, shape, dirty)
                    rows = as_rows(x, 3)
                    if op == "update":
                        local[k][r].update(rows, policies[k])
                        if r == rank:
                            s.update(x)
                    else:  # a local merge_ counts as this rank's new data at the next sync
                        part = reference_for(s)
                        part.update(rows, policies[k])
                        local[k][r].merge(part)
                        if r == rank:
                            other = make(k, shape, policies[k], accs[k])
                            other.update(x)
                            s.merge_(other)
        else:
            sync_stats(nn.ModuleList(stats.values()))
            for k in stats:
                agreed[k] = _global(agreed[k], local[k])
                local[k] = [_since_sync(agreed[k]) for _ in range(world)]
                if op == "reload":  # every rank reloads its synced state: its new agreed base
                    fresh = make(k, shape, policies[k], accs[k])
                    fresh.load_state_dict(stats[k].state_dict())
                    stats[k] = fresh
            for k, s in stats.items():
                check(s, agreed[k], accs[k])
            done.append(str(op))
    return done


def _since_sync(agreed: Any) -> Any:
    """A rank's reference right after a sync: EMA keeps the whole summary (each rank steps its
    own copy), the others only what is added from now on."""
    if isinstance(agreed, EMARef):
        return copy.deepcopy(agreed)
    return type(agreed)(agreed.n_features)


def _global(agreed: Any, news: list[Any]) -> Any:
    """The state every rank holds after a sync."""
    if not isinstance(agreed, EMARef):  # exact: the agreed data and every rank's new data
        out = copy.deepcopy(agreed)
        for r in news:
            out.merge(r)
        return out
    # EMA: the ranks' summaries mixed with weights = samples each added since the last sync
    # (equal weights when none did).
    added = [r.count - agreed.count for r in news]
    total = sum(added)
    weights = [n / total for n in added] if total else [1 / len(news)] * len(news)
    out = copy.deepcopy(agreed)
    out.mean = sum(w * r.mean for w, r in zip(weights, news, strict=True))
    pairs = list(zip(weights, news, strict=True))
    out.var = sum(w * (r.var + (r.mean - out.mean) ** 2) for w, r in pairs)
    out.weight = sum(w * r.weight for w, r in zip(weights, news, strict=True))
    out.count = agreed.count + total
    out.n_skipped = agreed.n_skipped + sum(r.n_skipped - agreed.n_skipped for r in news)
    return out


@pytest.mark.slow
def test_random_sequences_with_sync_on_two_gloo_ranks() -> None:
    done = run_distributed(_sync_fuzz_body, 2, 11, timeout=120.0)
    assert done[0] == done[1] and len(done[0]) >= 3
