"""Run a recipe from Python: what ``statplug fit`` does, returning the fitted objects.

>>> from statplug import run_recipe
>>> result = run_recipe("tabular", ["trainer.max_epochs=1"])  # doctest: +SKIP
>>> result.checkpoint_path, float(result.trainer.callback_metrics["val_acc"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statplug.config.build import Run, build, load_recipe

__all__ = ["RecipeRun", "checkpoint_path", "fit_run", "run_recipe"]


@dataclass
class RecipeRun:
    """What a recipe run leaves behind."""

    model: Any  # the fitted LightningModule
    trainer: Any  # the Trainer, after ``fit``
    checkpoint_path: str  # the checkpoint Lightning wrote, or a final one saved after ``fit``
    datamodule: Any
    config: dict[str, Any]  # the resolved recipe config (stored unresolved in the checkpoint)


def checkpoint_path(trainer: Any) -> str:
    """The checkpoint Lightning wrote, or a final one saved now (every rank calls this)."""
    cb = trainer.checkpoint_callback
    path = ""
    if cb is not None:
        path = cb.best_model_path or cb.last_model_path or ""
    if not path:
        root = Path(trainer.log_dir or trainer.default_root_dir)
        path = trainer.strategy.broadcast(str(root / "checkpoints" / "final.ckpt"))
        trainer.save_checkpoint(path)
    return str(Path(path).resolve())


@contextmanager
def _restored_threads() -> Iterator[None]:
    """Put torch's thread count (and ``OMP_NUM_THREADS``) back after a recipe set its own."""
    import torch

    threads = torch.get_num_threads()
    env = os.environ.get("OMP_NUM_THREADS")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


def fit_run(run: Run, *, progress: bool | None = None) -> RecipeRun:
    """Build ``run`` (seeded, with its ``num_threads``), fit it and find its checkpoint.

    ``progress`` shows or hides Lightning's progress bar whatever the config says (None: as the
    config says, Lightning's default being shown).
    """
    overrides = {} if progress is None else {"enable_progress_bar": bool(progress)}
    with _restored_threads():
        built = build(run, trainer_overrides=overrides)
        built.trainer.fit(built.model, datamodule=built.data)
        ckpt = checkpoint_path(built.trainer)
    return RecipeRun(built.model, built.trainer, ckpt, built.data, run.config)


def run_recipe(
    name_or_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    progress: bool | None = None,
    trust: bool = False,
) -> RecipeRun:
    """Run a recipe as ``statplug fit`` does, from Python; return the fitted objects.

    The recipe's ``seed`` seeds every rank and its ``num_threads`` sets torch's intra-op threads
    for the run (the previous count is restored afterwards). Outputs go under
    ``trainer.default_root_dir`` (default: the working directory).

    Args:
        name_or_path: a bundled recipe name (``statplug recipes``), a recipe YAML path, or a
            checkpoint written by a recipe run (its stored config is run again).
        overrides: ``key=value`` strings as on the command line (``"trainer.max_epochs=3"``,
            ``"trainer=ddp-cpu-2"``). Default: none.
        progress: show (True) or hide (False) Lightning's progress bar. Default: None (as the
            recipe says; shown when it does not say).
        trust: for a checkpoint given as the recipe: load it with ``weights_only=False`` and
            build whatever its stored config names, interpolations resolved; without it the
            stored config builds only statplug's classes and an allowlist (Lightning's Trainer,
            callbacks and loggers, torchmetrics metrics) (``statplug fit --trust``). A YAML
            recipe and ``overrides`` are your own and build whatever they name. Default: False.

    Returns:
        :class:`RecipeRun` with the fitted ``model``, the ``trainer``, the ``checkpoint_path``,
        the ``datamodule`` and the resolved ``config``.

    Raises:
        ConfigError: the recipe or an override is wrong (unknown key, bad value, bad YAML), or
            a checkpoint's stored config names a ``_target_`` outside the allowlist and
            ``trust`` is False.
    """
    return fit_run(load_recipe(name_or_path, overrides, trust=trust), progress=progress)
