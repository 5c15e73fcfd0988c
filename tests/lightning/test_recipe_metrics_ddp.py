"""The recipes' accuracy and validation loss are exact over uneven DDP ranks (torchmetrics).

Not a regression test: the recipes' earlier ``self.log(..., sync_dist=True, batch_size=n)`` was
exact too, since Lightning's epoch mean sums value x batch size and the batch sizes across ranks.
It guards the property against a change to plain per-rank means.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lit_models import run_script


@pytest.mark.slow
def test_val_acc_and_val_loss_are_global_over_uneven_ranks(tmp_path: Path) -> None:
    run_script("ddp_validate.py", str(tmp_path), timeout=240)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    logits = torch.cat([r0["logits"], r1["logits"]]).double()
    y = torch.cat([r0["y"], r1["y"]])
    acc = (logits.argmax(-1) == y).double().mean().item()  # over all 50 samples
    loss = F.cross_entropy(logits, y).item()
    per_rank = [(r["logits"].argmax(-1) == r["y"]).double().mean().item() for r in (r0, r1)]
    assert abs(sum(per_rank) / 2 - acc) > 0.02  # the mean of rank means would be wrong here
    for r in (r0, r1):
        assert r["metrics"]["val_acc"] == pytest.approx(acc, abs=1e-6)
        assert r["metrics"]["val_loss"] == pytest.approx(loss, rel=1e-5)
