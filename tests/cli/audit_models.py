"""Models (and a probe callback) for CLI tests, importable as `audit_models.<Name>`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from statplug import RunningNorm
from statplug.lightning import StatsMixin


class BufferInOptimizer(StatsMixin, pl.LightningModule):
    """Hands a stat's buffer to its optimizer: `buffer-in-optimizer`, an error."""

    def __init__(self, n_features: int = 3) -> None:
        super().__init__()
        self.norm = RunningNorm(n_features)
        self.head = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([*self.parameters(), self.norm.moments.mean], lr=0.1)


class ThreadProbe(pl.Callback):
    """Records torch's intra-op thread count when ``fit`` starts (``run_recipe`` tests)."""

    seen: list[int] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ThreadProbe.seen.append(torch.get_num_threads())
