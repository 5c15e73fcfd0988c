"""Stats under torch FSDP mixed precision (FSDP1 and FSDP2) on real gloo CPU ranks.

torch FSDP's ``MixedPrecision(buffer_dtype=torch.bfloat16)`` casts buffers by assigning
``buffer.data`` at its lazy init (first forward, state_dict or load), behind statplug's dtype
pinning. With :func:`statplug.exclude_from_fsdp_buffer_cast` called right after the wrap, every
stat keeps its dtypes and matches both a float64 numpy reference over the union of the ranks' data
and an unwrapped twin fed the same batches (bit for bit); without it the first update raises a
:class:`StatplugError` before any state changes. FSDP2 (``fully_shard``) never casts buffers.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_utils import run_distributed
from torch import Tensor, nn

from statplug import (
    EMAMoments,
    RunningMinMax,
    RunningMoments,
    RunningNorm,
    StatplugError,
    exclude_from_fsdp_buffer_cast,
    sync_stats,
)
from statplug._buffers import PinnedDtypeModule

FEATURES = 5
STEPS = 6
ROWS = (16, 12)  # per rank: uneven, so a merge that weights ranks equally shows
MOMENTUM = 0.2
WARM_ROWS = 40
STATS = ("norm.moments", "moments", "ema", "minmax")
REPO = Path(__file__).resolve().parents[2]


def _bf16_exact(x: Tensor) -> Tensor:
    """Data bf16 represents exactly: FSDP casts the root's inputs to ``param_dtype``, and this
    way the stats see the same values whether the cast happens or not."""
    return x.to(torch.bfloat16).float()


def rank_batches(rank: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [
        _bf16_exact(torch.randn(ROWS[rank], FEATURES, generator=g) * (2.0 + rank) + 3.0 + rank)
        for _ in range(STEPS)
    ]


def warm_batch() -> Tensor:
    """What the warm checkpoint's stats saw (the same on every rank, so it counts once)."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(WARM_ROWS, FEATURES, generator=g) * 3.0 + 1.0


class StatNet(nn.Module):
    """One of each stat on the (bf16-cast) root input, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = RunningNorm(FEATURES)
        self.moments = RunningMoments(FEATURES)
        self.ema = EMAMoments(FEATURES, momentum=MOMENTUM)
        self.minmax = RunningMinMax(FEATURES)
        self.head = nn.Linear(FEATURES, 1)

    def observe(self, x: Tensor) -> Tensor:
        """Update every stat with ``x``; the normalised ``x``."""
        self.moments(x)
        self.ema(x)
        self.minmax(x)
        return self.norm(x)  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.observe(x))  # type: ignore[no-any-return]


def warm_state() -> dict[str, Tensor]:
    """A checkpoint whose stats hold values bf16 cannot represent (loaded through FSDP below)."""
    torch.manual_seed(0)
    net = StatNet()
    net.observe(warm_batch())
    return {k: v.clone() for k, v in net.state_dict().items()}


def _stat_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in STATS:
        stat = model.get_submodule(name)
        out[name] = {k: v.detach().clone() for k, v in stat.state_dict().items()}
    return out


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {
        f"{n}.{b}": buf.dtype
        for n, m in model.named_modules()
        if isinstance(m, PinnedDtypeModule)
        for b, buf in m._buffers.items()
        if buf is not None
    }


def _wrap(model: StatNet, mode: str) -> nn.Module:
    """``model`` wrapped for ``mode``; the stats stay the same objects inside."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

    bf16 = torch.bfloat16
    if mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=bf16)
        fully_shard(model.head, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)  # type: ignore[no-any-return]
    kwargs: dict[str, Any] = {}
    if mode == "fsdp1-auto":  # nested instances: the head gets its own
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        kwargs["auto_wrap_policy"] = ModuleWrapPolicy({nn.Linear})
    return FullyShardedDataParallel(
        model,
        mixed_precision=MixedPrecision(param_dtype=bf16, buffer_dtype=bf16),
        device_id=torch.device("cpu"),  # FSDP looks for an accelerator unless told
        **kwargs,
    )


def _train_wrapped(rank: int, world: int, mode: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = StatNet()
    twin = copy.deepcopy(model)  # never wrapped: fed the same batches as FSDP hands the stats
    wrapped = _wrap(model, mode)
    excluded = exclude_from_fsdp_buffer_cast(wrapped)
    # A checkpoint loaded through FSDP: FSDP's lazy init (and its buffer cast) runs inside the
    # load. Loaded stats count once, whatever the number of ranks.
    warm = warm_state()
    if mode == "fsdp2":  # sharded parameters load from DTensors: load the stats alone
        stats_only = {k: v for k, v in warm.items() if not k.startswith("head.")}
        model.load_state_dict(stats_only, strict=False)
    else:
        wrapped.load_state_dict(warm)
    twin.load_state_dict(warm)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    for x in rank_batches(rank):
        loss = wrapped(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        twin.observe(x.to(torch.bfloat16))  # what the stats inside FSDP received
    before_sync = {"wrapped": _stat_state(model), "twin": _stat_state(twin)}
    sync_stats(model)
    sync_stats(twin)
    full = wrapped.state_dict() if mode != "fsdp2" else model.state_dict()
    saved = {k: v.detach().clone() for k, v in full.items() if k.split(".")[0] != "head"}
    return {
        "excluded": len(excluded),
        "dtypes": _dtypes(model),
        "twin_dtypes": _dtypes(twin),
        "before_sync": before_sync,
        "after_sync": {"wrapped": _stat_state(model), "twin": _stat_state(twin)},
        "saved": {k.replace("_fsdp_wrapped_module.", ""): v for k, v in saved.items()},
    }


def _body(rank: int, world: int) -> dict[str, Any]:
    return {mode: _train_wrapped(rank, world, mode) for mode in ("fsdp1", "fsdp1-auto", "fsdp2")}


# ----------------------------------------------------------------------------- reference
def _ema_reference(start: dict[str, Tensor], batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """EMAMoments' bias-corrected exponential mean and variance, float64, from a loaded state."""
    weight = float(start["weight"])
    mean = start["mean"].double().numpy().copy()
    var = start["var"].double().numpy().copy()
    for xb in batches:
        mb, vb = xb.mean(0), xb.var(0)
        weight = weight * (1 - MOMENTUM) + MOMENTUM
        r = MOMENTUM / weight
        delta = mb - mean
        mean = mean + r * delta
        var = var + r * (vb + delta * (mb - mean) - var)
    return {"weight": np.float64(weight), "mean": mean, "var": var}


def reference() -> dict[str, dict[str, np.ndarray]]:
    """float64 numpy state of every stat after both ranks' data and one sync."""
    warm = warm_batch().double().numpy()
    ranks = [[x.double().numpy() for x in rank_batches(r)] for r in range(len(ROWS))]
    union = np.concatenate([warm, *[np.concatenate(bs) for bs in ranks]])
    n = union.shape[0]
    mean = union.mean(0)
    moments = {"count": n, "mean": mean, "m2": ((union - mean) ** 2).sum(0)}
    # EMA: each rank runs on from the loaded state; a sync merges the rank summaries weighted
    # by the samples each saw since the load.
    start = warm_state()
    per_rank = [_ema_reference({k[4:]: v for k, v in start.items() if k.startswith("ema.")}, bs)
                for bs in ranks]
    w = np.array([sum(b.shape[0] for b in bs) for bs in ranks], dtype=np.float64)
    a = w / w.sum()
    ema_mean = sum(ai * r["mean"] for ai, r in zip(a, per_rank, strict=True))
    ema = {
        "count": n,
        "weight": sum(ai * r["weight"] for ai, r in zip(a, per_rank, strict=True)),
        "mean": ema_mean,
        "var": sum(ai * (r["var"] + (r["mean"] - ema_mean) ** 2)
                   for ai, r in zip(a, per_rank, strict=True)),
    }
    minmax = {"count": n, "min": union.min(0), "max": union.max(0)}
    return {"norm.moments": moments, "moments": moments, "ema": ema, "minmax": minmax}


def _assert_matches_reference(state: dict[str, dict[str, Tensor]], where: str) -> None:
    for stat, expected in reference().items():
        for key, value in expected.items():
            got = state[stat][key]
            # float64 for the cumulative moments, float32 for EMA and min/max (DESIGN.md §1)
            acc = torch.float64 if "moments" in stat else torch.float32
            assert got.dtype == (torch.int64 if key == "count" else acc), (where, stat)
            np.testing.assert_allclose(
                got.double().numpy(), value, rtol=2e-6, atol=1e-6, err_msg=f"{where} {stat}.{key}"
            )


def _assert_same(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    for stat in a:
        for key in a[stat]:
            x, y = a[stat][key], b[stat][key]
            assert x.dtype == y.dtype and torch.equal(x, y), (where, stat, key)


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def fsdp_runs() -> list[dict[str, Any]]:
    return run_distributed(_body, 2, timeout=180.0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp1", "fsdp1-auto", "fsdp2"])
def test_stats_keep_their_dtypes_and_match_float64_under_fsdp_mixed_precision(
    fsdp_runs: list[dict[str, Any]], mode: str
) -> None:
    for rank, runs in enumerate(fsdp_runs):
        run = runs[mode]
        where = f"{mode} rank {rank}"
        assert run["dtypes"] == run["twin_dtypes"], where  # nothing demoted, hidden state too
        if mode != "fsdp2":
            assert run["excluded"] > 0, where
        # FSDP changes nothing: the stats equal an unwrapped twin's bit for bit, before and
        # after the sync.
        _assert_same(run["before_sync"]["wrapped"], run["before_sync"]["twin"], where)
        _assert_same(run["after_sync"]["wrapped"], run["after_sync"]["twin"], where)
        _assert_matches_reference(run["after_sync"]["wrapped"], where)
        # FSDP's full state_dict saves them as they are (no bf16 round trip).
        for stat, state in run["after_sync"]["wrapped"].items():
            for key, value in state.items():
                saved = run["saved"][f"{stat}.{key}"]
                assert saved.dtype == value.dtype and torch.equal(saved, value), (where, key)
    # Every rank holds the same global stats after the sync.
    _assert_same(fsdp_runs[0][mode]["after_sync"]["wrapped"],
                 fsdp_runs[1][mode]["after_sync"]["wrapped"], mode)


# ----------------------------------------------------------------------------- failing loudly
def _unprotected_fsdp(rank: int, world: int) -> dict[str, Any]:
    """One rank: FSDP mixed precision without ``exclude_from_fsdp_buffer_cast``, and too late."""
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    model = StatNet()
    try:
        _wrap(model, "fsdp1")(rank_batches(0)[0])  # FSDP's lazy init casts, then the stats run
    except StatplugError as err:
        out["forward"] = str(err)
    out["count"] = int(model.moments._buffers["count"])  # type: ignore[arg-type]
    late = _wrap(StatNet(), "fsdp1")
    late.load_state_dict(warm_state())  # FSDP's lazy init casts (and rounds) inside the load
    try:
        exclude_from_fsdp_buffer_cast(late)
    except StatplugError as err:
        out["late"] = str(err)
    return out


@pytest.fixture(scope="module")
def unprotected() -> dict[str, Any]:
    (out,) = run_distributed(_unprotected_fsdp, 1, timeout=120.0)
    return out  # type: ignore[no-any-return]


@pytest.mark.slow
def test_fsdp_without_exclusion_fails_at_the_first_update_before_any_change(
    unprotected: dict[str, Any],
) -> None:
    assert "forward" in unprotected, "an FSDP-demoted stat updated silently"
    msg = unprotected["forward"]
    assert msg.startswith("RunningMoments:")
    assert "`mean` is torch.bfloat16 (pinned torch.float64)" in msg
    assert "exclude_from_fsdp_buffer_cast" in msg
    assert unprotected["count"] == 0  # the stat was left unchanged


@pytest.mark.slow
def test_exclusion_after_fsdp_already_cast_raises_instead_of_restoring(
    unprotected: dict[str, Any],
) -> None:
    assert "late" in unprotected, "rounded, loaded stats were silently promoted back"
    assert "already cast" in unprotected["late"] and "torch.bfloat16" in unprotected["late"]


def _fsdp_cast(module: nn.Module, dtype: torch.dtype) -> None:
    """What FSDP's lazy init does to each buffer it manages (its own function, run here)."""
    from torch.distributed.fsdp._runtime_utils import _cast_buffers_to_dtype_and_device

    bufs = list(module.buffers())
    _cast_buffers_to_dtype_and_device(bufs, [dtype] * len(bufs), torch.device("cpu"))


_F64 = torch.float64


@pytest.mark.parametrize(
    ("make", "x", "dtype"),
    [
        (lambda: RunningMoments(4), torch.randn(8, 4), torch.bfloat16),  # small-batch fast path
        (lambda: RunningMoments(4), torch.randn(3000, 4), torch.bfloat16),  # large batches
        (lambda: RunningMoments(4, nan_policy="skip"), torch.randn(8, 4), torch.float16),
        (lambda: RunningMoments((2, 2)), torch.randn(8, 2, 2), torch.bfloat16),
        (lambda: RunningMoments(4, accumulator_dtype=_F64), torch.randn(8, 4), torch.float32),
        (lambda: EMAMoments(4), torch.randn(8, 4), torch.bfloat16),
        (lambda: EMAMoments(4, accumulator_dtype=_F64), torch.randn(8, 4), torch.float32),
        (lambda: RunningMinMax(4), torch.randn(8, 4), torch.bfloat16),
        (lambda: RunningMinMax(4, accumulator_dtype=_F64), torch.randn(8, 4), torch.float32),
        (lambda: RunningNorm(4), torch.randn(8, 4), torch.bfloat16),
    ],
)
def test_a_buffer_data_cast_fails_at_the_next_update_and_changes_nothing(
    make: Any, x: Tensor, dtype: torch.dtype
) -> None:
    stat = make()
    stat(torch.randn(8, *x.shape[1:]) + 3)  # some state first
    _fsdp_cast(stat, dtype)
    before = {n: b.clone() for n, b in stat.named_buffers()}
    with pytest.raises(StatplugError, match="exclude_from_fsdp_buffer_cast"):
        stat(x)
    for n, b in stat.named_buffers():
        assert torch.equal(b, before[n]), n
    if isinstance(stat, RunningNorm):  # eval mode reads the stats without updating
        with pytest.raises(StatplugError, match=r"RunningNorm\.moments"):
            stat.eval()(x)


def test_pinned_conversions_still_pass_the_check() -> None:
    stat = RunningMoments(3, accumulator_dtype=torch.float64).to(torch.bfloat16).half().float()
    stat.update(torch.randn(5, 3))
    assert stat.mean.dtype == torch.float64 and stat.demoted_buffers() == []
    # Unwrapped models have nothing to exclude.
    assert exclude_from_fsdp_buffer_cast(nn.Sequential(RunningNorm(3))) == []


# ----------------------------------------------------------------------------- subprocesses
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with the repo importable; raise with its output when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=cwd)

    proc = run()
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        proc = run()  # torch's gloo teardown aborts now and then (see dist_utils.py)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _lightning_reference(epochs: int) -> dict[str, dict[str, np.ndarray]]:
    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    try:
        from fsdp_lightning_fit import ROWS as L_ROWS
        from fsdp_lightning_fit import rank_data
    finally:
        sys.path.pop(0)
    union = np.concatenate([rank_data(r).double().numpy() for r in range(len(L_ROWS))] * epochs)
    mean = union.mean(0)
    return {
        "norm.moments": {"count": union.shape[0], "mean": mean,
                         "m2": ((union - mean) ** 2).sum(0)},
        "minmax": {"count": union.shape[0], "min": union.min(0), "max": union.max(0)},
    }


@pytest.mark.slow
def test_lightning_fsdp_strategy_bf16_mixed_keeps_stats_exact_through_resume(
    tmp_path: Path,
) -> None:
    script = Path(__file__).parent / "scripts" / "fsdp_lightning_fit.py"
    _run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path)
    dumps = [
        (torch.load(tmp_path / f"first_rank{r}.pt", weights_only=True),
         torch.load(tmp_path / f"resumed_rank{r}.pt", weights_only=True))
        for r in range(2)
    ]
    first_ref, final_ref = _lightning_reference(1), _lightning_reference(2)
    for rank, (first, resumed) in enumerate(dumps):
        checks = (("first", first, first_ref), ("final", resumed["final"], final_ref))
        for when, state, ref in checks:
            for stat, expected in ref.items():
                dtypes = state[stat].pop("dtypes")
                fresh = {k: b.dtype for k, b in
                         (RunningMoments(4) if stat == "norm.moments" else RunningMinMax(4))
                         ._buffers.items() if b is not None}
                assert dtypes == fresh, (rank, when, stat)  # nothing demoted to bf16
                for key, value in expected.items():
                    np.testing.assert_allclose(state[stat][key].double().numpy(), value,
                                               rtol=2e-6, atol=1e-6,
                                               err_msg=f"rank {rank} {when} {stat}.{key}")
        # The checkpoint came back bit for bit (FSDP's lazy init runs inside the load).
        restored = {k: {n: v for n, v in s.items() if n != "dtypes"}
                    for k, s in resumed["restored"].items()}
        _assert_same(restored, first, f"rank {rank} restore")
    _assert_same(dumps[0][1]["final"], dumps[1][1]["final"], "ranks")


def test_lightning_refuses_fsdp_on_cpu_which_is_why_the_script_patches_device_id() -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(), logger=False)


# ----------------------------------------------------------------------------- README
def _readme_block(section: str) -> str:
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"README section {section!r} has no python block"
    return blocks[0]


@pytest.mark.slow
def test_readme_fsdp_example_runs_on_two_gloo_ranks(tmp_path: Path) -> None:
    script = tmp_path / "fsdp_example.py"
    script.write_text(_readme_block("FSDP"))
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", str(script)], cwd=tmp_path)
    # The workers share one pipe, so their lines may interleave: match the records, not lines.
    found = re.findall(r"rank (\d): (count=\d+ dtype=\S+) var=(\[[^\]]*\])", proc.stdout)
    assert sorted(r for r, _, _ in found) == ["0", "1"], proc.stdout
    # Both ranks print the same global stats, in float64, over both ranks' 2 x 20 x 32 rows.
    assert found[0][1:] == found[1][1:], found
    assert found[0][1] == "count=1280 dtype=torch.float64", found
    # ... equal to float64 over the data as the stat saw it (FSDP casts the root's inputs to bf16).
    data = []
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        data += [torch.randn(32, 8, generator=g) * 2 + 3 + rank for _ in range(20)]
    union = torch.cat(data).to(torch.bfloat16).double().numpy()
    got = np.array(ast.literal_eval(found[0][2]))
    np.testing.assert_allclose(got, union.var(0), rtol=1e-5)


def test_docstring_examples_run() -> None:
    import doctest

    import statplug._buffers
    import statplug.distributed.fsdp

    for mod in (statplug.distributed.fsdp, statplug._buffers):
        result = doctest.testmod(mod)
        assert result.failed == 0 and result.attempted > 0, mod.__name__
