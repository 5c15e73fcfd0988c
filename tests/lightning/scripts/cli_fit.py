"""A LightningCLI entry point for TinyModel: ``cli_fit.py fit --trainer.max_epochs=1 ...``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI
from lit_models import TinyModel, loader, make_data
from torch.utils.data import DataLoader


class CliModel(TinyModel):
    def train_dataloader(self) -> DataLoader:
        return loader(*make_data(24))


if __name__ == "__main__":
    LightningCLI(CliModel)
