"""Weight averaging with statplug state: StatsWeightAveraging, StatsEMAWeightAveraging, copy_stats_.

The reference for every stat and mask is the same fit without averaging: averaging must change
the weights and nothing else. Fits are a few steps on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging
from lit_models import QUIET, loader, make_data
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from statplug import (
    AuditBuffers,
    AuditError,
    EMAMoments,
    IncompatibleCallbackError,
    MagnitudePruning,
    RandomMask,
    RunningMinMax,
    RunningMoments,
    RunningNorm,
    SinusoidalEncoding,
    StatplugError,
    StatsEMAWeightAveraging,
    StatsMixin,
    StatsWeightAveraging,
    SyncStats,
    copy_stats_,
)
from statplug.averaging import state_buffers

EPOCHS, N_TRAIN, BATCH = 2, 48, 12  # 4 steps an epoch
DECAY = 0.6


class AvgModel(StatsMixin, pl.LightningModule):
    """Every stat class, a random mask and a BatchNorm; records what validation sees."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = RunningNorm(4)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.drop = RandomMask(8, 0.25, seed=3)
        self.head = nn.Linear(8, 1)
        # Fed with activations: equal to the reference only if the live weights never moved.
        self.hidden_stats = RunningMoments(8)
        self.target_ema = EMAMoments(1, momentum=0.1)
        self.target_range = RunningMinMax(1)
        # Updated by validation steps, which run on the swapped-in averaged weights.
        self.val_targets = RunningMoments(1)
        self.seen_in_validation: list[dict[str, Tensor]] = []
        self.weights_after_step: list[dict[str, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.net(self.norm(x)))
        if self.training:
            self.hidden_stats.update(h)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.target_ema.update(y)
        self.target_range.update(y)
        return F.mse_loss(self(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.weights_after_step.append(_weights(self))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_targets.update(y)
        self.log("val_loss", F.mse_loss(self(x), y))
        self.seen_in_validation.append({**statplug_state(self), **_weights(self)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def statplug_state(
    model: nn.Module, state_dict: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The saved statplug state of ``model`` (stats, masks), read from ``state_dict`` if given."""
    keys = [
        e.qualified_name
        for e in state_buffers(model)
        if e.name not in e.module._non_persistent_buffers_set
    ]
    source = model.state_dict() if state_dict is None else state_dict
    return {k: source[k].detach().clone() for k in keys}


def assert_equal_state(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        assert got[key].dtype == want[key].dtype, f"{what}: {key}"
        assert torch.equal(got[key], want[key]), f"{what}: {key}: {got[key]} != {want[key]}"


def _pruning() -> MagnitudePruning:
    return MagnitudePruning(lambda epoch: 0.25 * (epoch + 1), patterns=("net.*", "head"))


def fit(
    tmp_path: Path,
    callbacks: list[Any],
    *,
    ckpt_path: str | None = None,
    checkpoint: bool = True,
) -> tuple[AvgModel, pl.Trainer, ModelCheckpoint]:
    """Fit ``AvgModel``; with ``checkpoint``, a ModelCheckpoint saves every epoch (last)."""
    torch.manual_seed(0)
    model = AvgModel()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=[*callbacks, ckpt] if checkpoint else callbacks,
        enable_checkpointing=checkpoint,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **QUIET,
    )
    x, y = make_data(N_TRAIN, seed=1, loc=3.0, scale=2.0)
    xv, yv = make_data(12, seed=2, loc=3.0, scale=2.0)
    trainer.fit(model, loader(x, y, BATCH), loader(xv, yv, 12), ckpt_path=ckpt_path)
    return model, trainer, ckpt


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, AvgModel]:
    """The fits without averaging, with and without pruning."""
    return {
        pruned: fit(tmp_path_factory.mktemp(f"ref{pruned}"), [_pruning()] if pruned else [])[0]
        for pruned in (False, True)
    }


def _last_checkpoint(ckpt: ModelCheckpoint) -> dict[str, Any]:
    path = Path(ckpt.dirpath or "") / f"epoch={EPOCHS - 1}.ckpt"
    return torch.load(path, weights_only=True)  # type: ignore[no-any-return]


CASES = [
    pytest.param(lambda: StatsWeightAveraging(), "after", True, id="swa-pruning_after"),
    pytest.param(
        lambda: StatsEMAWeightAveraging(decay=DECAY), "before", True, id="ema-pruning_before"
    ),
    pytest.param(
        lambda: StatsEMAWeightAveraging(decay=DECAY, use_buffers=False),
        "after",
        True,
        id="ema-no_buffers-pruning_after",
    ),
    pytest.param(
        lambda: StatsWeightAveraging(use_buffers=False),
        "before",
        True,
        id="swa-no_buffers-pruning_before",
    ),
    pytest.param(lambda: StatsEMAWeightAveraging(decay=DECAY), "none", True, id="ema-no_pruning"),
    # No save after the last pruning round: only the train-end copy brings the averaged model to
    # the live masks.
    pytest.param(lambda: StatsWeightAveraging(), "after", False, id="swa-pruning_after-no_ckpt"),
]


@pytest.mark.parametrize(("make", "pruning", "checkpoint"), CASES)
def test_averaged_fit_keeps_the_live_stats_and_masks(
    tmp_path: Path,
    reference: dict[bool, AvgModel],
    make: Callable[[], WeightAveraging],
    pruning: str,
    checkpoint: bool,
) -> None:
    averaging = make()
    callbacks: list[Any] = {
        "before": [_pruning(), averaging],
        "after": [averaging, _pruning()],
        "none": [averaging],
    }[pruning]
    model, _, ckpt = fit(tmp_path, callbacks, checkpoint=checkpoint)
    ref = reference[pruning != "none"]

    # The model after fit: the reference's stats and masks, exactly.
    assert_equal_state(statplug_state(model), statplug_state(ref), "model after fit")
    assert int(model.norm.count) == EPOCHS * N_TRAIN
    assert int(model.val_targets.count) == EPOCHS * 12
    # Validation saw the same stats and masks, with other (averaged) weights.
    assert len(model.seen_in_validation) == len(ref.seen_in_validation) == EPOCHS
    for got, want in zip(model.seen_in_validation, ref.seen_in_validation, strict=True):
        assert_equal_state(statplug_state(model, got), statplug_state(ref, want), "validation")
        assert not torch.equal(got["head.weight"], want["head.weight"])
        for layer in ("net.0", "head") if pruning != "none" else ():
            # The averaged weights ran with the live masks applied.
            assert torch.all(got[f"{layer}.weight"][~got[f"{layer}.weight_mask"]] == 0)
    # The checkpoint's state_dict: averaged weights, the reference's stats and masks.
    if checkpoint:
        saved = _last_checkpoint(ckpt)
        assert_equal_state(
            statplug_state(model, saved["state_dict"]), statplug_state(ref), "checkpoint"
        )
        assert_equal_state(
            statplug_state(model, saved["current_model_state"]), statplug_state(ref), "checkpoint"
        )
        assert torch.equal(saved["state_dict"]["head.weight"], model.head.weight)
    # The weights: averaged, and with pruning zero wherever the live mask prunes.
    assert not torch.equal(model.head.weight, ref.head.weight)
    if pruning != "none":
        for layer in (model.net[0], model.head):
            mask = layer.weight_mask
            assert 0 < int((~mask).sum()) < mask.numel()
            assert torch.all(layer.weight[~mask] == 0)
    # BatchNorm's buffers are still Lightning's business: averaged with use_buffers=True.
    bn_averaged = not torch.equal(model.net[1].running_mean, ref.net[1].running_mean)
    assert bn_averaged == averaging._use_buffers


def test_averaged_weights_match_an_independent_average(
    tmp_path: Path, reference: dict[bool, AvgModel]
) -> None:
    steps = reference[False].weights_after_step  # the live weights after every step
    assert len(steps) == EPOCHS * N_TRAIN // BATCH
    swa, _, _ = fit(tmp_path / "swa", [StatsWeightAveraging()])
    ema, _, _ = fit(tmp_path / "ema", [StatsEMAWeightAveraging(decay=DECAY)])
    for name, param in swa.named_parameters():
        mean = torch.stack([s[name].double() for s in steps]).mean(0)
        torch.testing.assert_close(param.double(), mean, rtol=1e-5, atol=1e-6)
        average = steps[0][name].double()
        for s in steps[1:]:
            average = DECAY * average + (1 - DECAY) * s[name].double()
        torch.testing.assert_close(
            dict(ema.named_parameters())[name].double(), average, rtol=1e-5, atol=1e-6
        )


def test_resume_from_a_checkpoint_continues_the_average_exactly(tmp_path: Path) -> None:
    def callbacks() -> list[Any]:
        return [SyncStats(), StatsEMAWeightAveraging(decay=DECAY), _pruning()]

    full, _, ckpt = fit(tmp_path / "full", callbacks())
    first = Path(ckpt.dirpath or "") / "epoch=0.ckpt"
    saved = torch.load(first, weights_only=True)
    # Lightning saves the averaged copy as the state_dict (with the live stats and masks) and
    # the model itself beside it.
    assert int(saved["averaging_state"]["n_averaged"]) == N_TRAIN // BATCH
    state, current = saved["state_dict"], saved["current_model_state"]
    assert "net.0.weight_mask" in state
    assert_equal_state(statplug_state(full, state), statplug_state(full, current), "saved")
    assert not torch.equal(state["head.weight"], current["head.weight"])

    resumed, _, _ = fit(tmp_path / "resumed", callbacks(), ckpt_path=str(first))
    assert_equal_state(resumed.state_dict(), full.state_dict(), "resumed model")
    assert int(resumed.norm.count) == EPOCHS * N_TRAIN


@pytest.mark.parametrize(
    ("stock", "replacement"),
    [
        (WeightAveraging, "statplug.StatsWeightAveraging"),
        (EMAWeightAveraging, "statplug.StatsEMAWeightAveraging"),
    ],
)
@pytest.mark.parametrize("guard", [AuditBuffers, SyncStats])
def test_stock_weight_averaging_stops_fit_before_the_first_step(
    tmp_path: Path, stock: type[WeightAveraging], replacement: str, guard: type[Any]
) -> None:
    error = AuditError if guard is AuditBuffers else IncompatibleCallbackError
    model = AvgModel()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[stock(), guard()], default_root_dir=tmp_path, **QUIET
    )
    with pytest.raises(error, match=rf"{stock.__name__} would average.*{replacement}") as err:
        trainer.fit(model, loader(*make_data(N_TRAIN), BATCH))
    assert str(err.value).count(replacement) == 1
    assert trainer.global_step == 0 and int(model.norm.count) == 0


def test_audit_buffers_reports_stock_averaging_in_the_static_audit_unless_raising(
    tmp_path: Path,
) -> None:
    audit = AuditBuffers(on_error="ignore")
    trainer = pl.Trainer(
        max_steps=1, callbacks=[EMAWeightAveraging(), audit], default_root_dir=tmp_path, **QUIET
    )
    trainer.fit(AvgModel(), loader(*make_data(N_TRAIN), BATCH))
    assert audit.reports[0].codes() == ["stock-weight-averaging"]
    assert "statplug.StatsEMAWeightAveraging" in str(audit.reports[0])


class NoStatplugState(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_stock_weight_averaging_is_fine_without_statplug_state(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[EMAWeightAveraging(), SyncStats(), AuditBuffers()],
        default_root_dir=tmp_path,
        **QUIET,
    )
    trainer.fit(NoStatplugState(), loader(*make_data(N_TRAIN), BATCH))
    assert trainer.global_step == 2


# ------------------------------------------------------------------------------ plain PyTorch


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = RunningNorm(4)
        self.pos = SinusoidalEncoding(4, max_len=4)
        self.drop = RandomMask(4, 0.5, seed=1)
        self.layer = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.range = RunningMinMax(4)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 4]
        h = self.drop(self.pos(self.norm(x)))
        self.range(h)  # a Stat's forward updates it in training mode
        return self.bn(self.layer(h).mean(1))


def test_copy_stats_puts_the_live_state_into_an_averaged_model() -> None:
    torch.manual_seed(0)
    model = Plain()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(6, t, 4) * 3 + 2 for t in (3, 3, 7, 7)]  # T=7 grows the encoding
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        # update_parameters (use_buffers=False) copies every buffer by position: the grown
        # encoding table must reach the copy first.
        copy_stats_(averaged, model)
        averaged.update_parameters(model)
    model.drop.resample_(seed=5)  # changed after the last update
    model.layer.register_buffer("weight_mask", model.layer.weight > 0)  # added after the copy
    model.layer._statplug_fixed_buffers = ("weight_mask",)
    update_bn([x for x in data if x.shape[1] == 3], averaged)  # feeds the copy's stats too
    copy = averaged.module
    bn_before = copy.bn.running_mean.clone()
    weights_before = _weights(copy)
    assert int(copy.norm.count) != int(model.norm.count)

    names = copy_stats_(averaged, model)

    live = dict(model.named_buffers())
    for entry in state_buffers(model):
        got = dict(copy.named_buffers())[entry.qualified_name]
        assert got.dtype == live[entry.qualified_name].dtype
        assert torch.equal(got, live[entry.qualified_name]), entry.qualified_name
    assert set(names) == {e.qualified_name for e in state_buffers(model)}
    assert {"pos.pe", "drop.mask", "layer.weight_mask", "norm.moments.count"} <= set(names)
    assert int(copy.norm.count) == sum(x.shape[0] * x.shape[1] for x in data)
    assert copy.pos.pe.shape[0] == 7 and "layer.weight_mask" in copy.state_dict()
    assert copy.layer._statplug_fixed_buffers == ("weight_mask",)
    # Only statplug state moved: the averaged weights and BatchNorm's statistics are untouched.
    assert_equal_state(_weights(copy), weights_before, "weights")
    assert torch.equal(copy.bn.running_mean, bn_before)
    assert not torch.equal(copy.bn.running_mean, model.bn.running_mean)
    # The copy is independent of the live tensors.
    model.norm.update(torch.randn(5, 4))
    assert int(copy.norm.count) == int(model.norm.count) - 5


def test_copy_stats_docstring_example() -> None:
    import doctest

    import statplug.averaging

    result = doctest.testmod(statplug.averaging, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_copy_stats_names_a_module_dst_lacks() -> None:
    src = nn.Sequential(nn.Linear(2, 2), RunningMoments(2))
    with pytest.raises(StatplugError, match=r"`dst` has no module '1'.*same structure"):
        copy_stats_(nn.Sequential(nn.Linear(2, 2)), src)
