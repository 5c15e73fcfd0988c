"""A small CNN for sklearn's 8x8 digits (recipe `digits`)."""

from __future__ import annotations

from torch import Tensor, nn

from statplug.config.ranges import LearningRate, NonNegative, Size
from statplug.stats import RunningNorm

from .base import Classifier

__all__ = ["DigitsCNN"]


class DigitsCNN(Classifier):
    """Per-pixel ``RunningNorm``, two conv layers, a small classifier head.

    Layer names are stable for ``ActivationStats`` patterns: ``features.conv1``,
    ``features.conv2``, ``classifier.fc1``, ``classifier.fc2``.

    Args:
        channels: channels of the two conv layers. Default: ``[16, 32]``.
        hidden: width of the classifier's hidden layer. Default: 64.
        n_classes: Default: 10.
        lr: Default: 2e-3.
        weight_decay: Default: 0.0.
    """

    def __init__(
        self,
        channels: list[Size] | None = None,
        hidden: Size = 64,
        n_classes: Size = 10,
        lr: LearningRate = 2e-3,
        weight_decay: NonNegative = 0.0,
    ) -> None:
        super().__init__(n_classes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        c1, c2 = channels or [16, 32]
        # Corner pixels are always 0: clip keeps a rare non-zero one from exploding.
        self.norm = RunningNorm((1, 8, 8), eps=1e-2, clip=5.0)
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv2d(1, c1, 3, padding=1))
        self.features.add_module("act1", nn.ReLU())
        self.features.add_module("conv2", nn.Conv2d(c1, c2, 3, padding=1))
        self.features.add_module("act2", nn.ReLU())
        self.features.add_module("pool", nn.MaxPool2d(2))
        self.classifier = nn.Sequential()
        self.classifier.add_module("flatten", nn.Flatten())
        self.classifier.add_module("fc1", nn.Linear(c2 * 16, hidden))
        self.classifier.add_module("act", nn.ReLU())
        self.classifier.add_module("fc2", nn.Linear(hidden, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.norm(x)))
