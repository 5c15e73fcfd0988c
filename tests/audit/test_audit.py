"""statplug.audit (DESIGN.md section 4): one test per code, a clean model, the report, doctests."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import json

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed  # tests/ is on sys.path via its conftest.py
from torch import nn

import statplug
from statplug import (
    AuditError,
    AuditReport,
    CausalMask,
    EMAMoments,
    Finding,
    RandomMask,
    RotaryEncoding,
    RunningMinMax,
    RunningMoments,
    RunningNorm,
    SinusoidalEncoding,
    audit,
    sync_stats,
)
from statplug.audit import (
    CODES,
    check_fixed_buffers,
    check_rank_divergence,
    snapshot_fixed_buffers,
)
from statplug.stats import Stat


class Block(nn.Module):
    """Every kind of statplug state next to ordinary layers."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = RunningNorm(4)
        self.minmax = RunningMinMax(4)
        self.ema = EMAMoments(4)
        self.proj = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = RandomMask(4, 0.25, seed=1)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Block()
        self.moments = RunningMoments(4)
        self.causal = CausalMask(8)
        self.pe = SinusoidalEncoding(4, max_len=8)
        self.rope = RotaryEncoding(4, max_len=8)
        self.lstm = nn.LSTM(4, 4)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder.norm(self.pe(x))
        self.moments.update(h)
        self.encoder.minmax.update(h)
        self.encoder.ema.update(h)
        h, _ = self.lstm(self.encoder.drop(self.encoder.proj(h)))
        return self.head(h)


def codes(report: AuditReport) -> list[str]:
    return [f.code for f in report.findings]


def only(report: AuditReport, code: str) -> list[Finding]:
    assert set(codes(report)) == {code}, str(report)
    return report.findings


# ------------------------------------------------------------------------------------ clean model


def test_clean_model_with_correct_optimizers_has_no_findings() -> None:
    model = Model()
    snap = snapshot_fixed_buffers(model)
    model(torch.randn(3, 5, 4))
    model.pe(torch.zeros(1, 20, 4))  # regrows a derived table: legitimate
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    report = audit(model, opt, fixed_snapshot=snap, check_ranks=True)
    assert report.findings == []
    assert report.ok and report.errors == [] and report.warnings == []
    assert str(report) == "statplug audit: no findings"
    report.raise_for_errors()
    # One optimizer or a list, and no optimizer at all, are all clean.
    assert audit(model, [opt]).findings == []
    assert audit(model).findings == []
    # Frozen parameters left out of the optimizer are not a finding either.
    model.emb.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert audit(model, torch.optim.SGD(trainable, lr=0.1)).findings == []


# ------------------------------------------------------------------------------------ one per code


def test_buffer_in_optimizer() -> None:
    model = Model()
    params = list(model.parameters())
    # By identity: a stat's accumulator handed to the optimizer.
    opt = torch.optim.SGD([*params, model.encoder.norm.moments.mean], lr=0.1)
    (f,) = only(audit(model, opt), "buffer-in-optimizer")
    # Named after the stat the user built (the normaliser), with the buffer in the message.
    assert f.severity == "error" and f.name == "encoder.norm"
    assert "encoder.norm.moments.mean" in f.message
    assert "optimizer 0 (SGD) param group 0" in f.message and "model.parameters()" in f.message
    # Every buffer of the model in an optimizer: one finding per stat, never its internals.
    opt = torch.optim.SGD([*params, *model.buffers()], lr=0.1)
    names = [f.name for f in only(audit(model, opt), "buffer-in-optimizer")]
    stats = [n for n, m in model.named_modules() if isinstance(m, Stat) and ".moments" not in n]
    assert len(names) == len(set(names))
    assert set(stats) <= set(names)
    assert not any("_base" in n or n.endswith((".count", ".m2", ".n_skipped")) for n in names)

    # By shared storage: a view of a plain buffer is another tensor over the same memory.
    model.register_buffer("scale", torch.ones(6))
    view = model.scale[2:]
    opt = torch.optim.SGD([{"params": params}, {"params": [view]}], lr=0.1)
    (f,) = only(audit(model, opt), "buffer-in-optimizer")
    assert f.name == "scale" and "sharing its storage" in f.message and "param group 1" in f.message

    # Meta and empty buffers have no memory to share: no false match through storage address 0.
    meta = nn.Module()
    meta.register_buffer("a", torch.empty(0))
    meta.w = nn.Parameter(torch.empty(0))
    assert audit(meta, torch.optim.SGD(meta.parameters(), lr=0.1)).findings == []


def test_stat_is_parameter() -> None:
    model = Model()
    stat = model.encoder.norm.moments
    stat.offset = nn.Parameter(torch.zeros(4))  # registered in the stat's _parameters
    model.encoder.minmax._buffers["max"].requires_grad_(True)
    report = audit(model, torch.optim.SGD(model.parameters(), lr=0.1))
    found = only(report, "stat-is-parameter")
    assert [f.name for f in found] == ["encoder.norm", "encoder.minmax"]
    assert "encoder.norm.moments.offset" in found[0].message and "`max`" in found[1].message
    assert all(f.severity == "error" for f in found)
    assert "nn.Parameter" in found[0].message and "requires_grad=True" in found[1].message
    # A stat's own parameter is reported once, not again as missing from the optimizer.
    trainable = [p for p in model.parameters() if p is not stat.offset]
    assert codes(audit(model, torch.optim.SGD(trainable, lr=0.1))) == ["stat-is-parameter"] * 2


def test_duplicate_in_optimizer() -> None:
    model = Model()
    # Two optimizers sharing the head.
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    second = torch.optim.Adam(model.head.parameters())
    found = only(audit(model, [first, second]), "duplicate-in-optimizer")
    assert [f.name for f in found] == ["head.weight", "head.bias"]
    assert "optimizer 0 (SGD) param group 0; optimizer 1 (Adam) param group 0" in found[0].message
    # Two param groups of one optimizer (torch refuses this in add_param_group, not afterwards).
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups.append({**opt.param_groups[0], "params": [model.head.bias.data]})
    (f,) = only(audit(model, opt), "duplicate-in-optimizer")
    assert f.name == "head.bias" and f.severity == "error" and "2 times" in f.message


def test_param_not_in_optimizer() -> None:
    model = Model()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n != "head.bias"], lr=0.1)
    (f,) = only(audit(model, opt), "param-not-in-optimizer")
    assert f.name == "head.bias" and f.severity == "warning" and "[2]" in f.message
    # Only checked when optimizers are given.
    assert audit(model).findings == []


def test_frozen_param_in_optimizer() -> None:
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.emb.weight.requires_grad_(False)
    (f,) = only(audit(model, opt), "frozen-param-in-optimizer")
    assert f.name == "emb.weight" and f.severity == "warning"


def test_unregistered_tensor() -> None:
    model = Model()
    model.encoder.cache = torch.zeros(4)  # plain tensor
    model.extras = [torch.zeros(2), "label"]  # list holding a tensor
    model.lookup = {"a": torch.ones(1)}  # dict of tensors
    model.head.alias = model.encoder.bn.running_mean  # stale after .to(): buffers are replaced
    model.loose = [nn.Parameter(torch.zeros(2))]  # parameters in a plain list: never trained
    # Not findings: references to the model's own parameters (as nn.LSTM keeps), declared ones.
    model.own = [model.head.weight]
    model.head._statplug_unregistered_ok = ("scratch",)
    model.head.scratch = torch.zeros(1)
    found = only(audit(model, torch.optim.SGD(model.parameters(), lr=0.1)), "unregistered-tensor")
    by_name = {f.name: f for f in found}
    assert list(by_name) == ["extras", "lookup", "loose", "encoder.cache", "head.alias"]
    assert all(f.severity == "warning" for f in found)
    assert "register_buffer('cache'" in by_name["encoder.cache"].message
    assert "refers to a buffer" in by_name["head.alias"].message
    assert "nn.ParameterList" in by_name["loose"].message


def test_device_mismatch() -> None:
    model = Model()
    with torch.device("meta"):
        model.encoder.late = nn.Linear(4, 4)  # created on meta after the model was placed
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (f,) = only(audit(model, opt), "device-mismatch")
    assert f.severity == "error" and f.name == "encoder.late.weight"
    assert "2 parameter/buffer tensor(s) on meta" in f.message and "on cpu" in f.message
    assert "`encoder.late.weight`, `encoder.late.bias`" in f.message


def test_low_precision_stat() -> None:
    model = Model()
    stat = model.encoder.norm.moments
    stat._buffers["mean"] = stat._buffers["mean"].half()  # bypasses the dtype pinning
    model.encoder.ema._buffers["var"] = model.encoder.ema._buffers["var"].bfloat16()
    found = only(audit(model, torch.optim.SGD(model.parameters(), lr=0.1)), "low-precision-stat")
    assert [f.name for f in found] == ["encoder.norm", "encoder.ema"]
    assert "torch.float16 (expected torch.float64)" in found[0].message
    assert all(f.severity == "warning" for f in found)
    # The pinned path is fine: .half() keeps accumulators in float32.
    assert audit(Model().half()).findings == []


def test_fixed_buffer_mutated() -> None:
    model = Model()
    lin = model.head
    lin.register_buffer("weight_mask", torch.rand(2, 4) > 0.5)
    lin._statplug_fixed_buffers = ("weight_mask",)
    snap = snapshot_fixed_buffers(model)
    assert len(snap) == 8  # drop.mask/seed, causal.mask, pe.pe, rope x3, the pruning mask

    # Legitimate changes: regrowth, rebuild at max_len, resampling, loading another seed's mask.
    model.causal.mask(32)
    model.pe(torch.zeros(1, 40, 4))
    q = torch.randn(1, 50, 4)
    model.rope(q, q)
    model.rope.reset_parameters()  # shrinks back to max_len
    model.encoder.drop.resample_(7)
    model.encoder.drop.load_state_dict(RandomMask(4, 0.25, seed=3).state_dict())
    assert check_fixed_buffers(model, snap) == []

    # Real mutations: each reported once, named, as an error.
    with torch.no_grad():
        model.encoder.drop.mask.logical_not_()
        model.pe.pe.mul_(2.0)
        model.rope.inv_freq[0] += 1e-3
        lin.weight_mask.logical_not_()
        model.causal._buffers["mask"] = model.causal._buffers["mask"].clone().fill_(True)
    report = audit(model, torch.optim.SGD(model.parameters(), lr=0.1), fixed_snapshot=snap)
    found = only(report, "fixed-buffer-mutated")
    assert sorted(f.name for f in found) == [
        "causal.mask",
        "encoder.drop.mask",
        "head.weight_mask",
        "pe.pe",
        "rope.inv_freq",
    ]
    assert all(f.severity == "error" for f in found)
    pruning = next(f for f in found if f.name == "head.weight_mask")
    assert "snapshot.refresh(model)" in pruning.message

    # A deliberate change of a marked buffer is accepted after a refresh; a removal is not.
    model = Model()
    model.head.register_buffer("weight_mask", torch.ones(2, 4, dtype=torch.bool))
    model.head._statplug_fixed_buffers = ("weight_mask",)
    snap = snapshot_fixed_buffers(model)
    model.head.weight_mask[0, 0] = False
    assert [f.name for f in check_fixed_buffers(model, snap)] == ["head.weight_mask"]
    snap.refresh(model)
    assert check_fixed_buffers(model, snap) == []
    model.head.weight_mask = None
    (f,) = check_fixed_buffers(model, snap)
    assert f.name == "head.weight_mask" and "removed" in f.message

    # Meta-device construction, then to_empty() + reset_parameters(), is not a mutation.
    with torch.device("meta"):
        lazy = nn.Sequential(RandomMask(8, 0.5, seed=2), SinusoidalEncoding(4, max_len=8))
    snap = snapshot_fixed_buffers(lazy)
    lazy.to_empty(device="cpu")
    for m in lazy:
        m.reset_parameters()
    assert check_fixed_buffers(lazy, snap) == []
    with torch.no_grad():
        lazy[1].pe.zero_()
    assert [f.name for f in check_fixed_buffers(lazy, snap)] == ["1.pe"]


def test_rank_divergence_is_a_no_op_without_distributed() -> None:
    assert not dist.is_initialized()
    model = Model()
    assert check_rank_divergence(model) == []
    assert audit(model, check_ranks=True).findings == []


def _rank_divergence_body(rank: int, world_size: int) -> dict:
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):  # counts calls, the collective is real
        calls.append(kwargs.get("op"))
        return real_all_reduce(*args, **kwargs)

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(6, 5, 4) + rank  # each rank sees other data
    model(x)
    dist.all_reduce = counting_all_reduce
    try:
        before = check_rank_divergence(model)
    finally:
        dist.all_reduce = real_all_reduce
    n_calls, ops = len(calls), [str(op) for op in calls]
    sync_stats(model)
    after = check_rank_divergence(model)
    after_audit = audit(model, check_ranks=True).findings
    # Equal counts but a different value on one rank only.
    if rank == 1:
        with torch.no_grad():
            model.encoder.minmax.max[0] += 1.0
    tampered = check_rank_divergence(model)
    return {
        "before": [(f.code, f.name, f.message) for f in before],
        "n_calls": n_calls,
        "ops": ops,
        "after": after,
        "after_audit": after_audit,
        "tampered": [(f.code, f.name) for f in tampered],
    }


@pytest.mark.slow
def test_rank_divergence() -> None:
    r0, r1 = run_distributed(_rank_divergence_body, 2)
    assert r0["before"] == r1["before"]  # every rank reports the same findings
    names = [name for _, name, _ in r0["before"]]
    assert names == ["encoder.norm.moments", "encoder.minmax", "encoder.ema", "moments"]
    code, _, message = r0["before"][0]
    assert code == "rank-divergence" and CODES[code] == "error"
    assert "`mean`" in message and "`m2`" in message and "sync_stats" in message
    # The layout (fixed size, joined by every rank), then the fingerprints.
    assert r0["n_calls"] == 2 and all("MAX" in op.upper() for op in r0["ops"])
    assert r0["after"] == [] and r1["after"] == [] and r0["after_audit"] == []
    assert r0["tampered"] == r1["tampered"] == [("rank-divergence", "encoder.minmax")]


def _stat_less_rank_body(rank: int, world_size: int) -> dict:
    """Rank 1 holds no stats. It must still join the collective rank 0 enters: before, it
    returned early and rank 0 waited until the group's timeout."""
    model = Model() if rank == 0 else nn.Linear(2, 2)
    lonely = [(f.code, f.name, f.message) for f in check_rank_divergence(model)]
    none = check_rank_divergence(nn.Linear(2, 2))  # no rank holds a stat
    return {"lonely": lonely, "none": none}


@pytest.mark.slow
def test_a_rank_without_stats_joins_the_rank_check_and_nobody_hangs() -> None:
    r0, r1 = run_distributed(_stat_less_rank_body, 2, timeout=60, group_timeout=10)
    assert r0 == r1
    ((code, name, message),) = r0["lonely"]
    assert code == "rank-divergence" and name == "<stat layout>"
    assert "[4, 0] stats per rank" in message
    assert r0["none"] == []


# ------------------------------------------------------------------------------------ the report


def test_report_table_errors_and_dict() -> None:
    model = Model()
    model.cache = torch.zeros(1)
    opt = torch.optim.SGD([*model.parameters(), model.moments.mean, model.moments.m2], lr=0.1)
    report = audit(model, opt)
    # Two buffers of one stat: one finding, naming the stat.
    assert codes(report) == ["buffer-in-optimizer", "unregistered-tensor"]
    assert not report.ok and len(report.errors) == 1 and len(report.warnings) == 1
    lines = str(report).splitlines()
    assert lines[0].split() == ["code", "severity", "name", "message"]
    # Aligned columns: every row's message starts where the header's does.
    col = lines[0].index("message")
    assert all(line[col - 2 : col] == "  " and line[col] != " " for line in lines[1:-1])
    assert lines[-1] == "2 findings: 1 error, 1 warning"
    with pytest.raises(AuditError) as err:
        report.raise_for_errors()
    text = str(err.value)
    assert "1 error" in text and "moments.mean" in text
    assert "cache" not in text  # warnings do not make it an error
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is False and data["findings"][0]["code"] == "buffer-in-optimizer"
    assert set(CODES.values()) == {"error", "warning"} and len(CODES) == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.findings[0].code = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="optimizers"):
        audit(model, [opt, "not an optimizer"])


def test_exports() -> None:
    # `statplug.audit` is the function (the top-level export shadows the package attribute);
    # the package is reached with `from statplug.audit import ...` or importlib.
    assert {"audit", "AuditReport", "Finding"} <= set(statplug.__all__)
    assert statplug.audit is audit and statplug.AuditReport is AuditReport
    assert importlib.import_module("statplug.audit").audit is audit


@pytest.mark.parametrize("name", ["", ".checks", ".report", ".runtime"])
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module("statplug.audit" + name)
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_exact_fingerprint_does_not_depend_on_the_summation_order() -> None:
    from statplug._buffers import fingerprint

    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)) * 1e3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint(x, exact=True)
        torch.set_num_threads(2)
        two = fingerprint(x, exact=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    changed = x.clone()
    changed[12345] = torch.nextafter(changed[12345], torch.tensor(float("inf")))
    assert not torch.equal(fingerprint(changed, exact=True), one)  # one ulp shows
