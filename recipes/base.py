"""The training loop the recipe models share: cross-entropy, accuracy, AdamW."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from statplug.lightning import StatsMixin

__all__ = ["IGNORE", "Classifier"]

# The target of a padded position: cross-entropy's default ignore_index.
IGNORE = -100


class Classifier(StatsMixin, pl.LightningModule):
    """Cross-entropy classifier; logs ``train_loss``, ``train_acc``, ``val_loss`` and ``val_acc``.

    Subclasses build their layers in ``__init__`` (stats included, so they are saved and
    restored) and implement ``forward(x) -> logits``; logits of shape ``[..., C]`` are compared
    with targets of shape ``[...]`` (one class per sample, or per token); a target of
    :data:`IGNORE` (padding) counts nowhere.

    Accuracy and the validation loss are torchmetrics metrics: they keep counts and sums per
    rank and merge them at epoch end, so the figures are exact over every sample seen, also when
    ranks see different numbers of samples (averaging per-rank means would weight them wrongly).

    Args:
        n_classes: number of classes (the logits' last dimension).
        lr: AdamW learning rate. Default: 1e-3.
        weight_decay: Default: 0.0.
    """

    def __init__(self, n_classes: int, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: `lr` must be positive, got {lr!r}")
        self.lr = lr
        self.weight_decay = weight_decay
        # Targets of IGNORE (padding) count nowhere: not in the loss, not in the accuracy.
        self.train_acc = MulticlassAccuracy(n_classes, average="micro", ignore_index=IGNORE)
        self.val_acc = MulticlassAccuracy(n_classes, average="micro", ignore_index=IGNORE)
        self.val_loss = MeanMetric()

    def _logits(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        logits = logits.reshape(-1, logits.shape[-1])
        y = y.reshape(-1)
        return F.cross_entropy(logits, y, ignore_index=IGNORE), logits, y

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, logits, y = self._logits(batch)
        self.train_acc.update(logits.detach(), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, logits, y = self._logits(batch)
        self.val_acc.update(logits, y)
        self.val_loss.update(loss, weight=(y != IGNORE).sum())  # a per-sample mean
        self.log("val_loss", self.val_loss, prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
