"""Tiny LightningModules and data for the Lightning tests (importable by the subprocess scripts)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from statplug import RandomMask, RunningMoments, RunningNorm, StatsMixin

QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "enable_progress_bar": False,
    "logger": False,
    "enable_model_summary": False,
}


def make_data(
    n: int, n_in: int = 4, *, seed: int = 0, loc: float = 0.0, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g) * scale + loc
    w = torch.linspace(-1.0, 1.0, n_in)
    y = (x @ w).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def ddp_rank_data(rank: int) -> tuple[Tensor, Tensor, int]:
    """(x, y, batch size) of one DDP rank: different distributions and sizes, same step count."""
    if rank == 0:
        x, y = make_data(40, seed=10, loc=0.0, scale=1.0)
        return x, y, 8
    x, y = make_data(30, seed=11, loc=5.0, scale=2.0)
    return x, y, 6


def loader(x: Tensor, y: Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class TinyModel(StatsMixin, pl.LightningModule):
    """A normaliser in forward, a target stat in training_step, a random mask, a small MLP."""

    def __init__(
        self, n_in: int = 4, hidden: int = 8, lr: float = 0.05, extra_stat: bool = False
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.norm = RunningNorm(n_in)
        self.drop = RandomMask(hidden, 0.25, seed=3)
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 1)
        self.target_stats = RunningMoments(1)
        if extra_stat:
            self.extra = RunningMoments(hidden)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.net(self.norm(x)))
        if self.hparams.extra_stat and self.training:
            self.extra.update(h)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.target_stats.update(y)
        return F.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class PlainModel(pl.LightningModule):
    """The same layout without StatsMixin (a checkpoint with no statplug metadata)."""

    def __init__(self, n_in: int = 4, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.norm = RunningNorm(n_in)
        self.drop = RandomMask(hidden, 0.25, seed=3)
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 1)
        self.target_stats = RunningMoments(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.net(self.norm(x))))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.target_stats.update(y)
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.get("lr", 0.05))


def buffers_of(model: nn.Module) -> dict[str, Tensor]:
    """Every persistent buffer (stats, masks) of the model, materialised, on the CPU."""
    params = {n for n, _ in model.named_parameters()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in params}


def run_script(name: str, *args: str, timeout: float = 240.0) -> None:
    """Run ``tests/lightning/scripts/<name>`` in a new Python process; raise with its output."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    # The scripts import lit_models (here) and dist_utils (tests/).
    parts = [here, os.path.dirname(here), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("OMP_NUM_THREADS", "1")
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, os.path.join(here, "scripts", name), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    proc = run()
    # torch's gloo teardown aborts a DDP process now and then as it exits (see dist_utils.py):
    # that signature alone is retried, once.
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        proc = run()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name} {' '.join(args)} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )


def run_ranks(
    name: str, out_dir: Path, *tags: str, world: int = 2, timeout: float = 300.0
) -> dict[str, list[dict[str, Any]]]:
    """Run a DDP script (:func:`run_script`) for ``tags``; load what each rank wrote to
    ``out_dir/TAG_rank{r}.pt``, by tag."""
    run_script(name, str(out_dir), *tags, timeout=timeout)
    return {
        tag: [torch.load(out_dir / f"{tag}_rank{r}.pt", weights_only=True) for r in range(world)]
        for tag in tags
    }
