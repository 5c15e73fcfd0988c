"""Lightning FSDPStrategy, precision="bf16-mixed", 2 CPU ranks: ``fsdp_lightning_fit.py OUT``.

Lightning's launcher re-runs this script for rank 1. Fit one epoch and save a (sharded)
checkpoint, then resume from it for a second epoch. Each rank dumps its stats after the first fit
(``OUT/first_rank{r}.pt``), as restored at the start of the resumed fit and after it
(``OUT/resumed_rank{r}.pt``).

Lightning refuses FSDP on CPU (``Trainer`` raises "requires a GPU accelerator" for
``FSDPStrategy``, and its ``_setup_model`` passes ``device_id=None``, for which FSDP looks for an
accelerator). ``CPUFSDPStrategy`` changes only that: it passes ``device_id=cpu``. Its full
(``state_dict_type="full"``) checkpoint crashes in FSDP's CPU offload of parameters on CPU, so the
checkpoint is sharded. Everything else is Lightning's FSDP code path.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from statplug import RunningMinMax, RunningNorm, StatsMixin, SyncStats

FEATURES = 4
ROWS = (48, 36)  # per rank: uneven sizes, the same number of steps (FSDP gathers every step)
BATCH = (12, 9)
STATS = ("norm.moments", "minmax")


def rank_data(rank: int) -> Tensor:
    """Each rank's data, exactly representable in bf16 (FSDP casts the root's inputs to bf16)."""
    g = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(ROWS[rank], FEATURES, generator=g) * (2.0 + rank) + 3.0 + 2 * rank
    return x.to(torch.bfloat16).float()


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, with FSDP told that the compute device is the CPU."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class Model(StatsMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.norm = RunningNorm(FEATURES)
        self.minmax = RunningMinMax(FEATURES)
        self.head = nn.Linear(FEATURES, 1)
        self.restored: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        self.minmax(x)
        return self.head(self.norm(x)).float().square().mean()  # type: ignore[no-any-return]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        rank = self.global_rank
        return DataLoader(TensorDataset(rank_data(rank)), batch_size=BATCH[rank])

    def on_train_start(self) -> None:
        self.restored = stat_state(self)  # right after a checkpoint restore


def stat_state(model: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STATS:
        stat = model.get_submodule(name)
        out[name] = {k: v.detach().clone() for k, v in stat.state_dict().items()}
        out[name]["dtypes"] = {k: b.dtype for k, b in stat._buffers.items() if b is not None}
    return out


def trainer(out: str, epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=CPUFSDPStrategy(state_dict_type="sharded"),
        precision="bf16-mixed",
        max_epochs=epochs,
        use_distributed_sampler=False,
        callbacks=[SyncStats()],
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main(out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    ckpt = os.path.join(out, "first.ckpt")
    first = trainer(out, 1)
    model = Model()
    first.fit(model)
    first.save_checkpoint(ckpt)
    rank = first.global_rank
    torch.save(stat_state(model), os.path.join(out, f"first_rank{rank}.pt"))
    resumed = Model()
    trainer(out, 2).fit(resumed, ckpt_path=ckpt)
    torch.save(
        {"restored": resumed.restored, "final": stat_state(resumed)},
        os.path.join(out, f"resumed_rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
