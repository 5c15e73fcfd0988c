"""2-process DDP ``Trainer.validate`` of a recipe model on uneven ranks: ``ddp_validate.py OUT``.

Rank 0 validates 40 samples, rank 1 10 (no distributed sampler), so averaging per-rank means
would weight rank 1's samples four times as much. Each rank dumps its model's logits and targets
and the metrics Lightning reports to OUT/rank{r}.pt.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from lit_models import QUIET
from torch.utils.data import DataLoader, TensorDataset

from statplug.recipes import TabularMLP


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = TabularMLP(n_features=4, n_classes=3, hidden=8, depth=1)
    trainer = pl.Trainer(devices=2, strategy="ddp", use_distributed_sampler=False, **QUIET)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    g = torch.Generator().manual_seed(10 + rank)
    n = 40 if rank == 0 else 10
    x = torch.randn(n, 4, generator=g) * (1 + 3 * rank)
    y = torch.randint(0, 3, (n,), generator=g)
    trainer.validate(model, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    with torch.no_grad():
        logits = model.eval()(x)
    torch.save(
        {
            "logits": logits,
            "y": y,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
