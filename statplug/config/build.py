"""Build a recipe's objects from its validated config with ``hydra.utils.instantiate``.

Objects are built with ``_convert_="all"`` so constructors (and Lightning's
``save_hyperparameters``) receive plain ``dict``/``list`` values, never OmegaConf containers: a
checkpoint must load with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statplug.config.errors import ConfigError
from statplug.config.loader import Recipe, compose, unresolved
from statplug.config.targets import check_literal_text, check_targets, escape_for_hydra
from statplug.config.validate import validate
from statplug.errors import MissingExtraError

__all__ = ["Run", "build", "build_node", "load_recipe"]


@dataclass
class Run:
    """A loaded recipe: the composed config, its plain copies, and where it came from."""

    recipe: Recipe
    config: dict[str, Any]  # resolved, plain Python: what the objects are built from
    trusted: bool = False  # --trust was given (a checkpoint's config built as written)
    # Plain Python with interpolations unresolved: what the checkpoint stores, so that no value
    # from the environment (`${oc.env:TOKEN}`) is written into it. None: as `config`.
    stored: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def path(self) -> Path:
        return self.recipe.path


def load_recipe(
    recipe: str | Path,
    overrides: Sequence[str] = (),
    *,
    require: tuple[str, ...] = ("model", "data"),
    trust: bool = False,
) -> Run:
    """Compose ``recipe`` with ``overrides`` and validate it (nothing is built yet).

    Trust follows authorship: a YAML recipe the user names, its fragments and the command-line
    overrides build whatever ``_target_`` they name. A checkpoint given as ``recipe`` is a file
    someone else may have written: unless ``trust`` (``--trust``) it is read with
    ``weights_only=True`` and its stored config may build only statplug's classes and an
    allowlist (:mod:`statplug.config.targets`, :mod:`statplug.config.stored`).
    ``require`` names the top-level nodes that must be present (``statplug audit`` needs only
    the model).

    Raises:
        ConfigError: missing file, bad YAML, unknown key (with the closest valid key), bad value,
            a stored ``_target_`` or resolver refused without ``trust``.
    """
    composed = compose(recipe, overrides, trust=trust)
    # What a checkpoint's config may build was checked as it was read (compose): from here on
    # the config is built as written.
    plain = validate(
        composed.config,
        overridden=composed.overridden,
        recipe=composed.path,
        require=require,
        trust=True,
    )
    return Run(composed, plain, trusted=trust, stored=unresolved(composed.config))


def build_node(node: dict[str, Any], where: str, *, trust: bool = False, **kwargs: Any) -> Any:
    """Instantiate one ``_target_`` node; constructor errors become one-line ConfigErrors.

    Without ``trust`` every ``_target_`` in ``node`` must be allowed (checked again here, so a
    caller that skipped :func:`load_recipe` builds nothing else either) and no text may contain
    ``${``: Hydra resolves interpolations again, and a resolved string may read
    ``${oc.create:...}``. With ``trust`` such text is escaped, so it arrives as written.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not trust:
        check_targets(node, where=where)
        check_literal_text(node, where=where)
    try:
        return instantiate(escape_for_hydra(node), _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, MissingExtraError):
            raise cause from None
        user_error = isinstance(cause, ValueError | TypeError | InstantiationException) or (
            type(cause).__name__ == "MisconfigurationException"
        )
        if not user_error:
            raise
        text = str(cause).strip().splitlines()
        reason = text[-1] if text else type(cause).__name__
        raise ConfigError(
            f"bad value in `{where}` ({node.get('_target_')}): {reason}"
        ) from None


@dataclass
class Built:
    """The objects of a recipe, ready for ``trainer.fit(model, datamodule=data)``."""

    model: Any
    data: Any
    trainer: Any
    callbacks: list[Any]


def build(run: Run, *, trainer_overrides: dict[str, Any] | None = None) -> Built:
    """Seed, then build the model, data, callbacks and Trainer of ``run``.

    The model gets the config with its interpolations unresolved as ``statplug_config``
    (StatsMixin stores it in the checkpoint), so a checkpoint can re-run its recipe and holds no
    value read from the environment.
    """
    import lightning.pytorch as pl
    import torch

    cfg = run.config
    threads = cfg.get("num_threads")
    if threads is not None:
        # Tiny models gain nothing from intra-op threads, and on a busy or small machine the
        # threads' spinning costs several times the work. The environment variable reaches DDP's
        # re-launched ranks, and Lightning keeps an OMP_NUM_THREADS that is already set.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(int(threads))
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg["seed"]), workers=True, verbose=False)
    model = build_node(cfg["model"], "model", trust=True)
    model.statplug_config = run.stored if run.stored is not None else cfg
    data = build_node(cfg["data"], "data", trust=True)
    callbacks = [
        build_node(node, f"callbacks.{name}", trust=True)
        for name, node in (cfg.get("callbacks") or {}).items()
        if node is not None
    ]
    trainer_kwargs = dict(cfg.get("trainer") or {})
    trainer_kwargs.update(trainer_overrides or {})
    trainer = build_node(
        {"_target_": "lightning.pytorch.Trainer", **trainer_kwargs},
        "trainer",
        trust=True,
        callbacks=callbacks,
    )
    return Built(model=model, data=data, trainer=trainer, callbacks=callbacks)
