"""MLP on raw tabular features behind an exact running normaliser (recipes `tabular`, `pruning`)."""

from __future__ import annotations

from torch import Tensor, nn

from statplug.config.ranges import LearningRate, NonNegative, Positive, Probability, Size
from statplug.stats import RunningMinMax, RunningNorm

from .base import Classifier

__all__ = ["TabularMLP"]


class TabularMLP(Classifier):
    """``RunningNorm`` on the raw features, then an MLP.

    The normaliser learns each feature's mean and variance from the training batches (exactly,
    and merged across ranks by ``SyncStats``), so raw features of very different scales (breast
    cancer: areas in the thousands next to ratios near 0.1) need no preprocessing. A
    ``RunningMinMax`` records each raw feature's range for ``statplug inspect`` / ``plot``.

    Args:
        n_features: input features (30 for breast cancer, 13 for wine, 64 for digits).
        n_classes: Default: 2.
        hidden: width of the hidden layers. Default: 64.
        depth: number of hidden layers. Default: 2.
        dropout: Default: 0.1.
        clip: clip normalised features to ``[-clip, clip]``. Default: 5.0.
        lr: AdamW learning rate. Default: 1e-3.
        weight_decay: Default: 0.0.
    """

    def __init__(
        self,
        n_features: Size,
        n_classes: Size = 2,
        hidden: Size = 64,
        depth: Size = 2,
        dropout: Probability = 0.1,
        clip: Positive | None = 5.0,
        lr: LearningRate = 1e-3,
        weight_decay: NonNegative = 0.0,
    ) -> None:
        super().__init__(n_classes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        if depth < 1:
            raise ValueError(f"TabularMLP: `depth` must be >= 1, got {depth!r}")
        self.feature_range = RunningMinMax(n_features)
        self.norm = RunningNorm(n_features, clip=clip)
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        self.feature_range(x)  # updates in training mode only
        return self.net(self.norm(x))
