"""StatsMixin: checkpoint metadata, weights_only loading, layout check, load_from_checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lit_models import QUIET, PlainModel, TinyModel, buffers_of, loader, make_data
from omegaconf import OmegaConf

from statplug import CheckpointMismatchError, RunningMoments


def _fit(model: pl.LightningModule, tmp_path: Path, epochs: int = 1, n: int = 32) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, default_root_dir=tmp_path, **QUIET)
    trainer.fit(model, loader(*make_data(n)))
    return trainer


def _saved(model: pl.LightningModule, tmp_path: Path, name: str = "m.ckpt") -> Path:
    trainer = _fit(model, tmp_path)
    path = tmp_path / name
    trainer.save_checkpoint(path)
    return path


def test_metadata_is_plain_and_loads_with_weights_only(tmp_path: Path) -> None:
    model = TinyModel()
    model.statplug_config = OmegaConf.create({"lr": 0.05, "scaled": "${lr}", "layers": [4, 8]})
    path = _saved(model, tmp_path)
    ckpt = torch.load(path, weights_only=True)
    meta = ckpt["statplug"]
    assert meta["version"] == 1
    assert meta["config"] == {"lr": 0.05, "scaled": 0.05, "layers": [4, 8]}
    assert type(meta["config"]) is dict and type(meta["config"]["layers"]) is list
    stats = {s["name"]: s for s in meta["stats"]}
    assert set(stats) == {"norm.moments", "target_stats"}
    assert stats["norm.moments"] == {
        "name": "norm.moments",
        "kind": "RunningMoments",
        "shape": [4],
        "accumulator_dtype": "float64",
        "count": 32,
        "state": ["count", "n_skipped", "mean", "m2"],
        "frozen": False,
    }
    assert [(m["name"], m["kind"], m["persistent"]) for m in meta["masks"]] == [
        ("drop", "RandomMask", True)
    ]
    assert meta["encodings"] == []


def test_config_absent_is_none_and_plain_dict_is_kept(tmp_path: Path) -> None:
    model = TinyModel()
    ckpt: dict = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert ckpt["statplug"]["config"] is None
    model.statplug_config = {"a": (1, 2), "b": {"c": None}}
    model.on_save_checkpoint(ckpt)
    assert ckpt["statplug"]["config"] == {"a": [1, 2], "b": {"c": None}}


def test_load_from_checkpoint_without_trainer_restores_every_stat(tmp_path: Path) -> None:
    model = TinyModel()
    path = _saved(model, tmp_path)
    expected = buffers_of(model)
    assert int(model.norm.count) == 32
    loaded = TinyModel.load_from_checkpoint(path, weights_only=True)
    got = buffers_of(loaded)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # Not just the buffers: the read-outs (hidden float64 state rebuilt on load) agree too.
    assert torch.equal(loaded.norm.mean, model.norm.mean)
    assert torch.equal(loaded.norm.var, model.norm.var)
    assert int(loaded.target_stats.count) == 32


def test_missing_stat_raises_naming_it_and_the_fix(tmp_path: Path) -> None:
    path = _saved(TinyModel(), tmp_path)  # the "old" model version, without `extra`
    with pytest.raises(CheckpointMismatchError) as err:
        TinyModel.load_from_checkpoint(path, extra_stat=True)
    msg = str(err.value)
    assert "'extra' (RunningMoments)" in msg and "norm" not in msg.split("(expected")[0]
    assert 'missing_stats = "init"' in msg


def test_missing_stat_raises_on_resume_too(tmp_path: Path) -> None:
    path = _saved(TinyModel(), tmp_path)
    trainer = pl.Trainer(max_epochs=2, default_root_dir=tmp_path, **QUIET)
    with pytest.raises(CheckpointMismatchError, match="'extra'"):
        trainer.fit(TinyModel(extra_stat=True), loader(*make_data(32)), ckpt_path=path)


class InitModel(TinyModel):
    missing_stats = "init"


def test_missing_stats_init_loads_fresh_and_warns(tmp_path: Path) -> None:
    old = TinyModel()
    path = _saved(old, tmp_path)
    with pytest.warns(UserWarning, match=r"'extra' \(RunningMoments\).*start empty"):
        loaded = InitModel.load_from_checkpoint(path, extra_stat=True)
    assert int(loaded.extra.count) == 0
    assert torch.equal(loaded.norm.mean, old.norm.mean)  # the rest is restored
    # ... and it keeps training from there.
    trainer = pl.Trainer(max_epochs=2, default_root_dir=tmp_path, **QUIET)
    with pytest.warns(UserWarning, match="'extra'"):
        trainer.fit(InitModel(extra_stat=True), loader(*make_data(32)), ckpt_path=path)
    assert int(trainer.lightning_module.extra.count) == 32
    assert int(trainer.lightning_module.norm.count) == 64


def test_checkpoint_without_statplug_metadata_loads(tmp_path: Path) -> None:
    plain = PlainModel()
    path = _saved(plain, tmp_path)
    ckpt = torch.load(path, weights_only=True)
    assert "statplug" not in ckpt
    loaded = TinyModel.load_from_checkpoint(path)
    assert torch.equal(loaded.norm.mean, plain.norm.mean)
    assert int(loaded.target_stats.count) == 32


def test_stat_without_name_collision_and_no_warning_when_layout_matches(tmp_path: Path) -> None:
    path = _saved(TinyModel(extra_stat=True), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*weights_only.*")
        loaded = TinyModel.load_from_checkpoint(path, weights_only=True)
    assert isinstance(loaded.extra, RunningMoments) and int(loaded.extra.count) == 32
