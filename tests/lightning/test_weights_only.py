"""Every checkpoint statplug writes loads with ``torch.load(path, weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import QUIET, TinyModel, loader, make_data
from omegaconf import OmegaConf

from statplug import ActivationStats, AuditBuffers, MagnitudePruning, SyncStats


def test_every_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    model = TinyModel()
    # An OmegaConf config would make the file unloadable with weights_only=True if stored as is.
    model.statplug_config = OmegaConf.create({"model": {"hidden": 8}, "seed": 0})
    callbacks = [
        SyncStats(every_n_train_steps=2),
        AuditBuffers(),
        ActivationStats(),
        ActivationStats(["head"], min_max=False),  # a second instance: its own state_key
        MagnitudePruning(0.25),
        ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=3, save_top_k=-1),
        ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="last-{epoch}", save_last=True),
    ]
    trainer = pl.Trainer(max_epochs=2, callbacks=callbacks, default_root_dir=tmp_path, **QUIET)
    x, y = make_data(32)
    trainer.fit(model, loader(x, y), loader(x, y))
    trainer.save_checkpoint(tmp_path / "ckpts" / "manual.ckpt")
    paths = sorted((tmp_path / "ckpts").glob("*.ckpt"))
    assert len(paths) >= 4
    for path in paths:
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["statplug"]["config"] == {"model": {"hidden": 8}, "seed": 0}
        states = ckpt["callbacks"]
        activation_keys = [k for k in states if k.startswith("ActivationStats")]
        assert len(activation_keys) == 2, path
        assert any(k.startswith("MagnitudePruning") for k in states)
        assert "net.0.weight_mask" in ckpt["state_dict"]
