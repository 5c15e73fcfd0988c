"""Resuming from a mid-epoch checkpoint with a plain DataLoader: the stats count some samples
twice (Lightning runs the epoch's first batches again); statplug says so, once, with the number."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import QUIET, PlainModel, TinyModel, make_data
from torch.utils.data import DataLoader, TensorDataset

from statplug import SyncStats

N, BATCH, SAVE_EVERY = 80, 8, 3  # 10 batches per epoch; a checkpoint after batches 3, 6, 9
_SECOND_TIME = "a second time"


class ResumableLoader(DataLoader):  # type: ignore[type-arg]
    """A loader Lightning treats as resumable (it has ``state_dict``/``load_state_dict``)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _fit(
    tmp_path: Path,
    model: pl.LightningModule,
    *,
    ckpt_path: Path | None = None,
    loader_cls: type[DataLoader] = DataLoader,  # type: ignore[type-arg]
    callbacks: tuple[Any, ...] = (),
) -> list[str]:
    """Fit one epoch (saving every 3 steps); return statplug's resume warnings."""
    x, y = make_data(N)
    data = loader_cls(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    save = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=SAVE_EVERY, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=1, default_root_dir=tmp_path, callbacks=[save, *callbacks], **QUIET
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return [str(w.message) for w in caught if _SECOND_TIME in str(w.message)]


def test_mid_epoch_resume_warns_once_with_the_samples_counted_twice(tmp_path: Path) -> None:
    assert _fit(tmp_path, TinyModel()) == []
    ckpt = tmp_path / "ck" / "epoch=0-step=3.ckpt"
    model = TinyModel()
    # The mixin and SyncStats both watch for it; one warning.
    found = _fit(tmp_path, model, ckpt_path=ckpt, callbacks=(SyncStats(),))
    assert len(found) == 1, found
    assert "after batch 3 of 10" in found[0] and "3 batches (24 samples)" in found[0]
    # The number is what happened: the resumed epoch ran batches 0..6 after batches 0..2 had been
    # counted, so the target stats hold y[:24] twice (and never y[56:]), against float64 numpy.
    _, y = make_data(N)
    seen = np.concatenate([y[:24].double().numpy(), y[:56].double().numpy()])
    assert int(model.target_stats.count) == N
    assert float(model.target_stats.mean) == pytest.approx(seen.mean(), rel=1e-5)
    assert float(model.target_stats.var) == pytest.approx(seen.var(), rel=1e-4)


def test_the_warning_counts_the_batches_run_again_late_in_the_epoch(tmp_path: Path) -> None:
    _fit(tmp_path, TinyModel())
    found = _fit(tmp_path, TinyModel(), ckpt_path=tmp_path / "ck" / "epoch=0-step=9.ckpt")
    assert len(found) == 1 and "after batch 9 of 10" in found[0], found
    assert "1 batches (8 samples)" in found[0]


def test_a_model_without_the_mixin_is_warned_by_sync_stats(tmp_path: Path) -> None:
    _fit(tmp_path, PlainModel(), callbacks=(SyncStats(),))
    ckpt = tmp_path / "ck" / "epoch=0-step=6.ckpt"
    model = PlainModel()
    found = _fit(tmp_path, model, ckpt_path=ckpt, callbacks=(SyncStats(),))
    assert len(found) == 1 and found[0].startswith("SyncStats:"), found
    # 6 of 10 batches done: the resumed epoch runs 4 batches, all of them seen before.
    assert "4 batches (32 samples)" in found[0]
    _, y = make_data(N)
    seen = np.concatenate([y[:48].double().numpy(), y[:32].double().numpy()])
    assert float(model.target_stats.mean) == pytest.approx(seen.mean(), rel=1e-5)


def test_no_warning_for_a_resumable_loader_or_an_epoch_end(tmp_path: Path) -> None:
    _fit(tmp_path, TinyModel(), loader_cls=ResumableLoader)
    ckpt = tmp_path / "ck" / "epoch=0-step=3.ckpt"
    assert _fit(tmp_path, TinyModel(), ckpt_path=ckpt, loader_cls=ResumableLoader) == []
    end = tmp_path / "end.ckpt"
    model = TinyModel()
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, **QUIET)
    x, y = make_data(N)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=BATCH))
    trainer.save_checkpoint(end)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(max_epochs=2, default_root_dir=tmp_path, **QUIET).fit(
            TinyModel(), DataLoader(TensorDataset(x, y), batch_size=BATCH), ckpt_path=end
        )
    assert not [w for w in caught if _SECOND_TIME in str(w.message)]
