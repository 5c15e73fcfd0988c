"""The training loop the recipe models share: cross-entropy, accuracy, AdamW."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from statplug.lightning import StatsMixin

__all__ = ["Classifier"]


class Classifier(StatsMixin, pl.LightningModule):
    """Cross-entropy classifier; logs ``train_loss``, ``val_loss`` and ``val_acc``.

    Subclasses build their layers in ``__init__`` (stats included, so they are saved and
    restored) and implement ``forward(x) -> logits``; logits of shape ``[..., C]`` are compared
    with targets of shape ``[...]`` (one class per sample, or per token).
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: `lr` must be positive, got {lr!r}")
        self.lr = lr
        self.weight_decay = weight_decay

    def _loss_acc(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        logits = logits.reshape(-1, logits.shape[-1])
        y = y.reshape(-1)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, acc

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, acc = self._loss_acc(batch)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", acc, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, acc = self._loss_acc(batch)
        n = batch[1].numel()
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val_acc", acc, prog_bar=True, sync_dist=True, batch_size=n)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
