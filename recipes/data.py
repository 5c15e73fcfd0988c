"""Datamodules for the recipes: sklearn's bundled data sets and synthetic sequences (no download).

Every split is drawn from a seeded generator, so every DDP rank builds the same data and
Lightning's distributed sampler hands each rank its own part of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from statplug._extras import require
from statplug.config.ranges import Range, Size

from .base import IGNORE

__all__ = ["SequenceDataModule", "SklearnDataModule"]

SklearnName = Literal["breast_cancer", "wine", "digits", "iris"]
Fraction = Annotated[float, Range(low=0.0, high=1.0, low_open=True, high_open=True)]


def _loader(name: str) -> Callable[..., Any]:
    datasets = require("sklearn.datasets", "loading the recipes' scikit-learn data sets")

    loaders: dict[str, Callable[..., Any]] = {
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
    }
    if name not in loaders:
        raise ValueError(
            f"SklearnDataModule: `dataset` must be one of {sorted(loaders)}, got {name!r}"
        )
    return loaders[name]


def _stratified_split(
    y: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with each class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return rng.permutation(np.concatenate(train)), np.sort(np.concatenate(val))


class _TensorDataModule(pl.LightningDataModule):
    """Loaders over the ``train_set`` / ``val_set`` that a subclass's ``setup`` builds."""

    batch_size: int
    train_set: TensorDataset | None = None
    val_set: TensorDataset | None = None

    def train_dataloader(self) -> DataLoader[Any]:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=256)


class SklearnDataModule(_TensorDataModule):
    """One of scikit-learn's bundled classification data sets, raw features, stratified split.

    Features are left as they are (normalising them is the model's ``RunningNorm``'s job).

    Args:
        dataset: ``"breast_cancer"`` (569 x 30, 2 classes), ``"wine"`` (178 x 13, 3 classes),
            ``"digits"`` (1797 x 64, 10 classes) or ``"iris"``. Default: ``"breast_cancer"``.
        batch_size: Default: 32.
        val_fraction: share of each class held out for validation. Default: 0.2.
        split_seed: seed of the split. Default: 0.
        image_shape: reshape each sample, e.g. ``[1, 8, 8]`` for digits as images. Default: None.
    """

    def __init__(
        self,
        dataset: SklearnName = "breast_cancer",
        batch_size: Size = 32,
        val_fraction: Fraction = 0.2,
        split_seed: int = 0,
        image_shape: list[Size] | None = None,
    ) -> None:
        super().__init__()
        _loader(dataset)  # fail at construction on an unknown name
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"SklearnDataModule: `val_fraction` must be in (0, 1), got {val_fraction!r}"
            )
        if batch_size < 1:
            raise ValueError(f"SklearnDataModule: `batch_size` must be >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = _loader(self.dataset)(return_X_y=True)
        x = torch.as_tensor(x, dtype=torch.float32)
        if self.image_shape is not None:
            x = x.reshape(-1, *self.image_shape)
        y_t = torch.as_tensor(y, dtype=torch.int64)
        train, val = _stratified_split(np.asarray(y), self.val_fraction, self.split_seed)
        self.train_set = TensorDataset(x[train], y_t[train])
        self.val_set = TensorDataset(x[val], y_t[val])


class SequenceDataModule(_TensorDataModule):
    """Synthetic next-token prediction: arithmetic progressions modulo ``vocab_size``.

    Each sequence starts at a random token and moves by a random step (1 .. ``max_step``), so
    from its second token on the next token is determined by the two before it: the model must
    attend to the previous position, which a causal transformer with positions learns quickly.
    Inputs are ``seq[:-1]``, targets ``seq[1:]``; the first target is not predictable, which caps
    accuracy at ``(seq_len - 1) / seq_len`` plus chance.

    Args:
        vocab_size: Default: 16.
        seq_len: tokens per sample (inputs have ``seq_len - 1``). Default: 16.
        max_step: largest step of a progression. Default: 3.
        n_train: Default: 2048. n_val: Default: 256.
        batch_size: Default: 64.
        seed: Default: 0.
        min_len: when set, each sequence has a random length in ``[min_len, seq_len]`` and is
            padded to ``seq_len``: padded inputs hold the token ``vocab_size`` (one past the
            vocabulary) and padded targets ``IGNORE`` (-100). Default: None (no padding).
    """

    def __init__(
        self,
        vocab_size: Size = 16,
        seq_len: Size = 16,
        max_step: Size = 3,
        n_train: Size = 2048,
        n_val: Size = 256,
        batch_size: Size = 64,
        seed: int = 0,
        min_len: Size | None = None,
    ) -> None:
        super().__init__()
        if seq_len < 3:
            raise ValueError(f"SequenceDataModule: `seq_len` must be >= 3, got {seq_len!r}")
        if min_len is not None and not 3 <= min_len <= seq_len:
            raise ValueError(
                f"SequenceDataModule: `min_len` must be in [3, seq_len={seq_len}] or None, got "
                f"{min_len!r}"
            )
        self.min_len = min_len
        if not 1 <= max_step < vocab_size:
            raise ValueError(
                f"SequenceDataModule: `max_step` must be in [1, vocab_size), got {max_step!r}"
            )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.max_step = max_step
        self.n_train = n_train
        self.n_val = n_val
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _make(self, n: int, gen: torch.Generator) -> TensorDataset:
        start = torch.randint(0, self.vocab_size, (n, 1), generator=gen)
        step = torch.randint(1, self.max_step + 1, (n, 1), generator=gen)
        seq = (start + step * torch.arange(self.seq_len)) % self.vocab_size
        x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
        if self.min_len is not None:  # pad each sequence after its own length
            length = torch.randint(self.min_len, self.seq_len + 1, (n, 1), generator=gen)
            pad = torch.arange(self.seq_len - 1) >= length - 1
            x[pad], y[pad] = self.vocab_size, IGNORE
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        self.train_set = self._make(self.n_train, gen)
        self.val_set = self._make(self.n_val, gen)
