"""Gradient accumulation: a stat sees every micro-batch exactly once (issue 23)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
from lit_models import QUIET, TinyModel, loader, make_data


def test_accumulate_grad_batches_updates_stats_with_every_micro_batch_once(tmp_path) -> None:
    """With ``accumulate_grad_batches=k`` Lightning runs the forward of every micro-batch and
    steps the optimizer every k of them: the normaliser in the forward counts each row once, as
    without accumulation, and holds the float64 moments of all rows seen."""
    x, y = make_data(37, seed=4, loc=3.0, scale=2.0)  # a ragged last micro-batch
    model = TinyModel()
    trainer = pl.Trainer(
        max_epochs=2, accumulate_grad_batches=3, default_root_dir=tmp_path,
        enable_checkpointing=False, **QUIET,
    )
    trainer.fit(model, loader(x, y, batch_size=5))
    rows = np.concatenate([x.double().numpy()] * 2)
    assert int(model.norm.count) == len(rows)
    np.testing.assert_allclose(model.norm.mean.numpy(), rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(model.norm.var.numpy(), rows.var(0), rtol=1e-5)
    assert trainer.global_step == 2 * 3  # 8 micro-batches an epoch: 3 optimizer steps
