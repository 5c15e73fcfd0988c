"""Fit for resume-exactness tests: ``resume_fit.py MODE OUT_DIR`` (run in its own process).

MODE ``full``: fit 2N epochs, dump the state to OUT_DIR/full.pt.
MODE ``first``: fit N epochs; ModelCheckpoint writes OUT_DIR/epoch{N-1}.ckpt.
MODE ``resume``: fit to 2N epochs from OUT_DIR/epoch{N-1}.ckpt, dump to OUT_DIR/resumed.pt.
Several modes may be joined with commas.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import QUIET, TinyModel, loader, make_data

from statplug import ActivationStats, AuditBuffers, MagnitudePruning, SyncStats

N_EPOCHS = 2


def callbacks(out_dir: str) -> list[Any]:
    return [
        SyncStats(),
        AuditBuffers(),
        ActivationStats(["net.*", "head"]),
        MagnitudePruning(lambda epoch: min(0.15 * (epoch + 1), 0.6)),
        # Saves on validation end, i.e. before the epoch-end hooks (pruning) of that epoch: the
        # hard case for resuming (the default saves on train epoch end, after every callback).
        ModelCheckpoint(
            dirpath=out_dir,
            filename="epoch{epoch}",
            auto_insert_metric_name=False,
            save_top_k=-1,
            save_on_train_epoch_end=False,
        ),
    ]


def fit(out_dir: str, epochs: int, ckpt_path: str | None) -> tuple[TinyModel, list[Any]]:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = TinyModel()
    cbs = callbacks(out_dir)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=cbs, default_root_dir=out_dir, deterministic=True, **QUIET
    )
    x, y = make_data(48)
    vx, vy = make_data(16, seed=1)
    trainer.fit(model, loader(x, y), loader(vx, vy), ckpt_path=ckpt_path)
    return model, cbs


def dump(model: TinyModel, cbs: list[Any], path: str) -> None:
    activation = next(cb for cb in cbs if isinstance(cb, ActivationStats))
    pruning = next(cb for cb in cbs if isinstance(cb, MagnitudePruning))
    torch.save(
        {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "activations": activation.state_dict(),
            "pruning": pruning.state_dict(),
        },
        path,
    )


def main() -> None:
    modes, out_dir = sys.argv[1].split(","), sys.argv[2]
    for mode in modes:
        if mode == "full":
            dump(*fit(os.path.join(out_dir, "full"), 2 * N_EPOCHS, None), f"{out_dir}/full.pt")
        elif mode == "first":
            fit(out_dir, N_EPOCHS, None)
        elif mode == "resume":
            ckpt = os.path.join(out_dir, f"epoch{N_EPOCHS - 1}.ckpt")
            model, cbs = fit(out_dir, 2 * N_EPOCHS, ckpt)
            dump(model, cbs, f"{out_dir}/resumed.pt")
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
