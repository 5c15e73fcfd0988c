"""ActivationStats excludes padding through `mask_fn` (issue 23); the tinylm recipe uses it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lit_models import QUIET
from torch import nn

from statplug import ActivationStats
from statplug.recipes import SequenceDataModule, TinyLM, padding_mask


class _Fake:
    global_step = 0


def test_mask_fn_drops_padded_rows_of_token_outputs_and_keeps_pooled_ones() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.tok = nn.Linear(3, 4)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    cb = ActivationStats(["tok"], mask_fn=lambda batch: batch[1])
    cb.attach(model)
    cb.on_train_batch_start(_Fake(), None, (x, mask), 0)  # type: ignore[arg-type]
    with cb.recording():
        out = model.tok(x)
        pooled = model.tok(x.mean(1))  # [B, F]: not the mask's rows, recorded whole
    moments, minmax = cb.layer_stats["tok"]
    rows = np.concatenate([out[mask].detach().double().numpy(), pooled.detach().double().numpy()])
    assert int(moments.count) == len(rows) == 7 + 2
    np.testing.assert_allclose(moments.mean.double().numpy(), rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(minmax.min.double().numpy(), rows.min(0), rtol=1e-6)


def test_mask_fn_must_return_a_bool_mask() -> None:
    cb = ActivationStats(mask_fn=lambda batch: batch.float())
    with pytest.raises(ValueError, match="`mask_fn` must return a bool tensor"):
        cb.on_train_batch_start(_Fake(), None, torch.ones(2, 3), 0)  # type: ignore[arg-type]


def test_padded_tinylm_fit_counts_real_tokens_only(tmp_path: Any) -> None:
    data = SequenceDataModule(n_train=96, n_val=32, batch_size=32, seq_len=12, min_len=5)
    model = TinyLM(dim=16, heads=2, layers=1)
    cb = ActivationStats(["blocks.*"], mask_fn=padding_mask)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], default_root_dir=tmp_path,
                         enable_checkpointing=False, **QUIET)
    trainer.fit(model, data)
    assert data.train_set is not None
    real = int((data.train_set.tensors[1] != -100).sum())
    assert real < data.train_set.tensors[1].numel()  # there was padding
    assert int(model.hidden_stats.count) == real
    for name, (moments, _) in cb.layer_stats.items():
        assert int(moments.count) == real, name
