"""The callbacks on one process: hooks, timing, state, checkpoints (multi-process: test_ddp.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import QUIET, TinyModel, loader, make_data
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from statplug import (
    ActivationStats,
    AuditBuffers,
    AuditError,
    CheckpointMismatchError,
    MagnitudePruning,
    RunningMoments,
    StatsMixin,
    SyncStats,
)


def _trainer(tmp_path: Path, callbacks: list[Any], **kw: Any) -> pl.Trainer:
    kw = {"max_epochs": 1, "default_root_dir": tmp_path, **QUIET, **kw}
    return pl.Trainer(callbacks=callbacks, **kw)


# ---------------------------------------------------------------------------------- SyncStats


def test_sync_stats_excludes_stat_buffers_in_setup_and_syncs_at_the_right_points(
    tmp_path: Path,
) -> None:
    sync = SyncStats(every_n_train_steps=2)
    events: list[str] = []
    sync.add_listener(lambda trainer, module, event: events.append(event))
    model = TinyModel()
    trainer = _trainer(tmp_path, [sync], max_epochs=1, num_sanity_val_steps=0)
    x, y = make_data(32)
    trainer.fit(model, loader(x, y), loader(x, y))
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert {"norm.moments.count", "norm.moments.mean", "target_stats.m2"} <= ignored
    assert not any(n.startswith(("net.", "head.", "drop.")) for n in ignored)  # other buffers
    # 4 steps: every 2nd step, then validation start/end, epoch end, train end.
    assert events == [
        "train_batch_end",
        "train_batch_end",
        "validation_start",
        "validation_end",
        "train_epoch_end",
        "train_end",
    ]
    assert sync.last_report is not None and sync.last_report.n_stats == 2
    assert sync.last_report.n_collectives == 0  # one process: nothing to talk to


def test_sync_stats_syncs_before_step_based_model_checkpoint(tmp_path: Path) -> None:
    sync = SyncStats()
    events: list[tuple[str, int]] = []
    sync.add_listener(lambda trainer, module, event: events.append((event, trainer.global_step)))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer = _trainer(tmp_path, [sync, ckpt], max_epochs=1)
    trainer.fit(TinyModel(), loader(*make_data(64)))
    assert ("train_batch_end", 3) in events and ("train_batch_end", 6) in events
    assert ("train_batch_end", 4) not in events


def test_sync_stats_arguments_and_state_key() -> None:
    with pytest.raises(ValueError, match="every_n_train_steps"):
        SyncStats(every_n_train_steps=0)
    assert SyncStats().state_key != SyncStats(every_n_train_steps=5).state_key


def test_sync_stats_adds_late_stats_to_a_wrapped_ddp_ignore_set(tmp_path: Path) -> None:
    # DDP re-reads `parameters_to_ignore` at every buffer broadcast: what on_fit_start relies on
    # for stats created in configure_model, after SyncStats.setup. Checked on a 1-rank group.
    from dist_utils import run_distributed

    assert run_distributed(_late_stats_body, 1) == [True]


def _late_stats_body(rank: int, world_size: int) -> bool:
    model = nn.Sequential(nn.Linear(2, 2))
    ddp = DistributedDataParallel(model)
    model.add_module("late", RunningMoments(2))

    class FakeStrategy:
        pass

    class FakeTrainer:
        strategy = FakeStrategy()
        callbacks: list[Any] = []

    FakeTrainer.strategy.model = ddp  # type: ignore[attr-defined]
    SyncStats().on_fit_start(FakeTrainer(), model)  # type: ignore[arg-type]
    ddp._assign_modules_buffers()
    return "late.mean" in ddp.parameters_to_ignore and all(
        b is not model.late.mean for b in ddp.modules_buffers
    )


# ---------------------------------------------------------------------------------- AuditBuffers


class BufferInOptimizer(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([*self.parameters(), self.norm.moments.mean], lr=0.1)


def test_audit_buffers_stops_fit_before_the_first_step(tmp_path: Path) -> None:
    model = BufferInOptimizer()
    trainer = _trainer(tmp_path, [AuditBuffers(on_error="raise")])
    with pytest.raises(AuditError) as err:
        trainer.fit(model, loader(*make_data(32)))
    assert "buffer-in-optimizer" in str(err.value)
    assert "norm.moments.mean" in str(err.value)
    assert model.steps == 0 and trainer.global_step == 0
    assert int(model.norm.count) == 0  # not one forward ran


def test_audit_buffers_warn_and_ignore(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.warns(UserWarning, match="norm.moments.mean"):
        _trainer(tmp_path, [AuditBuffers(on_error="warn")]).fit(
            BufferInOptimizer(), loader(*make_data(16))
        )
    cb = AuditBuffers(on_error="ignore")
    with caplog.at_level(logging.WARNING, logger="statplug"):
        _trainer(tmp_path, [cb]).fit(BufferInOptimizer(), loader(*make_data(16)))
    assert cb.reports[0].codes() == ["buffer-in-optimizer"]
    assert "buffer-in-optimizer" in caplog.text  # the table is logged


def test_audit_buffers_clean_model_and_pruning_rounds_give_no_findings(tmp_path: Path) -> None:
    cb = AuditBuffers()
    callbacks = [SyncStats(), MagnitudePruning(lambda e: 0.3 * (e + 1)), cb]
    _trainer(tmp_path, callbacks, max_epochs=2).fit(TinyModel(), loader(*make_data(32)))
    assert cb.reports and all(r.findings == [] for r in cb.reports)


class MutatesMask(TinyModel):
    def on_train_epoch_end(self) -> None:
        with torch.no_grad():
            self.drop.mask.logical_not_()


def test_audit_buffers_finds_a_mutated_mask_at_epoch_end(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [AuditBuffers()], max_epochs=2)
    with pytest.raises(AuditError, match=r"fixed-buffer-mutated.*drop\.mask"):
        trainer.fit(MutatesMask(), loader(*make_data(16)))
    # The module's own on_train_epoch_end runs after the callbacks': the mutation made at the end
    # of epoch 0 is found at the next check, the end of epoch 1.
    assert trainer.current_epoch == 1


# ---------------------------------------------------------------------------------- ActivationStats


class ConvModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.seq = nn.Linear(5, 6)  # [B, T, 5] -> [B, T, 6]: features last
        self.fixed = nn.Identity()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        img, seq = batch
        out = self.conv(img).mean() + self.seq(seq).mean() + self.fixed(seq).sum() * 0
        return out

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        img, seq = batch
        self.conv(img)
        self.seq(seq)
        self.fixed(seq)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: outputs are reproducible


def _conv_data(n: int = 24) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 4, 4, generator=g) * 2 + 1, torch.randn(n, 7, 5, generator=g) + 3


def test_activation_stats_match_a_float64_reference(tmp_path: Path) -> None:
    img, seq = _conv_data()
    cb = ActivationStats(["conv", "seq", "fixed"], log_min_max=True)
    model = ConvModel()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(img, seq), batch_size=8)
    trainer = _trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(model, dl, dl)  # validation forwards must not count
    stats = cb.layer_stats
    assert list(stats) == ["conv", "seq", "fixed"]
    with torch.no_grad():
        conv_out = model.conv(img).double().movedim(1, -1).reshape(-1, 3)  # per channel
        seq_out = model.seq(seq).double().reshape(-1, 6)  # per last-dim feature
    for name, ref in (("conv", conv_out), ("seq", seq_out), ("fixed", seq.double().reshape(-1, 5))):
        moments, minmax = stats[name]
        assert minmax is not None
        n = ref.shape[0] * 2  # two epochs of the same data
        assert int(moments.count) == n, name
        torch.testing.assert_close(moments.mean.double(), ref.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            moments.var.double(), ref.var(0, unbiased=False), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(minmax.min.double(), ref.min(0).values)
        torch.testing.assert_close(minmax.max.double(), ref.max(0).values)
    metrics = trainer.callback_metrics
    torch.testing.assert_close(
        metrics["activations/conv/mean"].double(), conv_out.mean(0).mean(), rtol=1e-4, atol=1e-5
    )
    assert {"activations/seq/std", "activations/fixed/min", "activations/conv/max"} <= set(metrics)


def test_activation_stats_patterns_and_model_state_dict_untouched(tmp_path: Path) -> None:
    model = TinyModel()
    keys_before = set(model.state_dict())
    cb = ActivationStats(["net.*", "head"], min_max=False)
    _trainer(tmp_path, [cb]).fit(model, loader(*make_data(16)))
    assert list(cb.layer_stats) == ["net.0", "net.1", "head"]
    assert all(mm is None for _, mm in cb.layer_stats.values())
    assert set(model.state_dict()) == keys_before  # nothing registered on the model
    assert int(cb.layer_stats["head"][0].count) == 16


def test_activation_stats_no_graph_and_no_update_outside_training_steps() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    cb = ActivationStats()
    cb.attach(model)
    model(torch.randn(4, 3))  # not inside a training step: ignored
    assert cb.layer_stats == {}
    with cb.recording():
        out = model(torch.randn(4, 3, requires_grad=True))
        model.eval()
        model(torch.randn(4, 3))  # eval mode: ignored
        model.train()
    assert out.requires_grad
    # The Sequential returned its child's output tensor: recorded once, as the child.
    assert list(cb.layer_stats) == ["0"]
    moments, minmax = cb.layer_stats["0"]
    assert int(moments.count) == 4 and minmax is not None
    assert not any(b.requires_grad for b in moments.buffers())
    cb.detach()


class _TupleOut(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


def test_activation_stats_warns_about_layers_returning_no_tensor() -> None:
    model = nn.Sequential(nn.Linear(3, 2), _TupleOut())
    cb = ActivationStats(["1"])
    cb.attach(model)
    with pytest.warns(UserWarning, match=r"layer '1' returns a tuple, not a tensor"):
        with cb.recording():
            model(torch.randn(4, 3))
    assert cb.layer_stats == {}
    cb.detach()


def test_activation_stats_state_roundtrip_recreates_stats(tmp_path: Path) -> None:
    img, seq = _conv_data()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(img, seq), batch_size=8)
    cb = ActivationStats(["conv", "seq"])
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(ConvModel(), dl)
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][cb.state_key]
    assert [entry["name"] for entry in state["layers"]] == ["conv", "seq"]
    fresh = ActivationStats(["conv", "seq"])
    fresh.load_state_dict(state)
    for name, (moments, minmax) in cb.layer_stats.items():
        m2, mm2 = fresh.layer_stats[name]
        assert torch.equal(m2.count, moments.count) and torch.equal(m2.mean, moments.mean)
        assert torch.equal(m2.m2, moments.m2)
        assert minmax is not None and mm2 is not None and torch.equal(mm2.max, minmax.max)
    # Resuming continues the restored stats (created from the saved shapes before any forward).
    resumed = ActivationStats(["conv", "seq"])
    trainer2 = _trainer(tmp_path, [resumed], max_epochs=2)
    trainer2.fit(ConvModel(), dl, ckpt_path=path)
    assert int(resumed.layer_stats["conv"][0].count) == 2 * 24 * 16


def _recorded_activation_stats() -> ActivationStats:
    cb = ActivationStats(["0"])
    model = nn.Sequential(nn.Linear(3, 4))
    cb.attach(model)
    with cb.recording():
        model(torch.randn(5, 3) + 2.0)
    return cb


def test_activation_stats_restored_after_setup_land_on_the_model_device() -> None:
    # FSDP, DeepSpeed and ModelParallel restore after on_fit_start, with the model on its device
    # already ("meta" stands in for a GPU here: any device other than the CPU).
    state = _recorded_activation_stats().state_dict()
    late = ActivationStats(["0"])
    model = nn.Sequential(nn.Linear(3, 4)).to("meta")
    late.attach(model)
    late.load_state_dict(state)
    assert {b.device.type for s in late.all_stats() for b in s.buffers()} == {"meta"}


def test_activation_stats_save_each_stat_with_its_version() -> None:
    from statplug import RunningMinMax

    cb = _recorded_activation_stats()
    state = cb.state_dict()
    assert "version" not in state  # one version scheme: each stat's own `_version`
    (entry,) = state["layers"]
    assert entry["versions"] == {"moments": RunningMoments._version,
                                 "minmax": RunningMinMax._version}
    # The stat's own version check runs: a state from a newer statplug is refused.
    newer = {**state, "layers": [{**entry, "versions": {"moments": RunningMoments._version + 1}}]}
    with pytest.raises(CheckpointMismatchError, match="newer"):
        ActivationStats(["0"]).load_state_dict(newer)
    # An older checkpoint (a callback-wide version, no per-stat versions) still loads.
    older = {"version": 1, **state, "layers": [{k: v for k, v in entry.items() if k != "versions"}]}
    fresh = ActivationStats(["0"])
    fresh.load_state_dict(older)
    (moments, _), (want, _) = fresh.layer_stats["0"], cb.layer_stats["0"]
    assert torch.equal(moments.mean, want.mean) and torch.equal(moments.count, want.count)


def test_activation_stats_warns_on_a_checkpoint_without_its_state(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [])
    trainer.fit(TinyModel(), loader(*make_data(16)))
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    cb = ActivationStats(["head"])
    with pytest.warns(UserWarning, match="holds no state"):
        _trainer(tmp_path, [cb], max_epochs=2).fit(
            TinyModel(), loader(*make_data(16)), ckpt_path=path
        )
    assert int(cb.layer_stats["head"][0].count) == 16


def test_activation_stats_bf16_outputs_and_step_logging(tmp_path: Path) -> None:
    cb = ActivationStats(["net.0"], log_every_n_steps=1)
    trainer = _trainer(tmp_path, [cb], precision="bf16-true", max_epochs=1)
    trainer.fit(TinyModel(), loader(*make_data(16)))
    moments, _ = cb.layer_stats["net.0"]
    assert moments.mean.dtype == torch.float32 and int(moments.count) == 16
    assert "activations/net.0/mean" in trainer.callback_metrics


# ---------------------------------------------------------------------------------- pruning


class TwoLayer(StatsMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 1)
        self.frozen_before = None

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_pruning_masks_are_buffers_applied_in_forward(tmp_path: Path) -> None:
    model = TwoLayer()
    pruning = MagnitudePruning(lambda epoch: [0.25, 0.5][epoch])
    trainer = _trainer(tmp_path, [pruning], max_epochs=2)
    trainer.fit(model, loader(*make_data(32)))
    keys = set(model.state_dict())
    assert {"a.weight", "a.weight_mask", "a.bias", "b.weight", "b.weight_mask", "b.bias"} == keys
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(model.a.weight_mask) not in in_optimizer
    for layer in (model.a, model.b):
        mask = layer.weight_mask
        assert mask.dtype == torch.bool
        assert mask.numel() - int(mask.sum()) == round(0.5 * mask.numel())  # per layer
        assert bool((layer.weight[~mask] == 0).all())  # saved weights are pruned
        kept = layer.weight[mask].abs()
        assert float(kept.min()) >= float(layer.weight.abs()[~mask].max())
    assert pruning.current_amount == 0.5 and pruning.n_rounds == 2
    # The mask is applied in forward even after the weights change (e.g. an optimizer step).
    with torch.no_grad():
        model.a.weight.add_(1.0)
    model(torch.randn(2, 4))
    assert bool((model.a.weight[~model.a.weight_mask] == 0).all())


class PlainTwoLayer(pl.LightningModule):
    """TwoLayer without StatsMixin: its checkpoints' masks could not be loaded back."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_pruning_a_model_without_the_mixin_stops_at_fit_start(tmp_path: Path) -> None:
    """Without the mixin `load_from_checkpoint` refuses the masks as unexpected keys: the fit
    stops before it writes a checkpoint that cannot be loaded back, and says what to add."""
    model = PlainTwoLayer()
    before = model.a.weight.detach().clone()
    trainer = _trainer(tmp_path, [MagnitudePruning(0.5)], enable_checkpointing=True)
    fix = r"PlainTwoLayer.*class PlainTwoLayer\(StatsMixin"
    with pytest.raises(CheckpointMismatchError, match=fix):
        trainer.fit(model, loader(*make_data(32)))
    assert torch.equal(model.a.weight, before)  # no step ran
    assert not list(tmp_path.rglob("*.ckpt"))
    # The same model with the mixin trains, and its checkpoint loads back without a Trainer.
    model = TwoLayer()
    trainer = _trainer(tmp_path, [MagnitudePruning(0.5)])
    trainer.fit(model, loader(*make_data(32)))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = TwoLayer.load_from_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(loaded.a.weight_mask, model.a.weight_mask)


def test_pruning_global_scope_and_schedule(tmp_path: Path) -> None:
    model = TwoLayer()
    pruning = MagnitudePruning(0.6, scope="global", schedule=[1], patterns=("a", "b"))
    trainer = _trainer(tmp_path, [pruning], max_epochs=2)
    trainer.fit(model, loader(*make_data(32)))
    assert pruning.last_pruned_epoch == 1 and pruning.n_rounds == 1
    masks = torch.cat([model.a.weight_mask.reshape(-1), model.b.weight_mask.reshape(-1)])
    assert masks.numel() - int(masks.sum()) == round(0.6 * masks.numel())


def test_pruning_checkpoint_resume_and_load_from_checkpoint(tmp_path: Path) -> None:
    model = TinyModel()
    trainer = _trainer(tmp_path, [MagnitudePruning(0.5)])
    trainer.fit(model, loader(*make_data(32)))
    path = tmp_path / "p.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["state_dict"]["net.0.weight_mask"].dtype == torch.bool
    assert "net.0.weight" in ckpt["state_dict"]
    # Without a Trainer (no callback): the mixin registers the masks the file holds.
    loaded = TinyModel.load_from_checkpoint(path)
    assert torch.equal(loaded.net[0].weight_mask, model.net[0].weight_mask)
    assert torch.equal(loaded.net[0].weight, model.net[0].weight)
    # Resuming with the callback: masks were registered in setup, strict loading succeeds.
    pruning = MagnitudePruning(0.5)
    trainer2 = _trainer(tmp_path, [pruning], max_epochs=2)
    trainer2.fit(TinyModel(), loader(*make_data(32)), ckpt_path=path)
    assert pruning.n_rounds == 2


def test_pruning_two_forwards_in_one_step_do_not_break_autograd() -> None:
    model = TwoLayer()
    pruning = MagnitudePruning(0.5)
    pruning.setup(None, model, "fit")  # type: ignore[arg-type]
    pruning.prune_(model, 0.5)
    with torch.no_grad():
        model.a.weight.add_(0.1)  # like an optimizer step: the next forward re-applies the mask
    loss = model(torch.randn(3, 4)).sum() + model(torch.randn(3, 4)).sum()
    loss.backward()
    assert bool((model.a.weight[~model.a.weight_mask] == 0).all())


def test_pruning_arguments() -> None:
    with pytest.raises(ValueError, match="amount"):
        MagnitudePruning(1.5)
    with pytest.raises(ValueError, match="scope"):
        MagnitudePruning(0.5, scope="row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="returned for epoch 3"):
        MagnitudePruning(lambda e: 2.0).amount_at(3)
