"""Which `_target_`s a checkpoint's config may build without --trust, and Hydra's second
interpolation pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from statplug.config import ConfigError, build_node, load_recipe
from statplug.config.targets import check_targets, escape_interpolations, is_allowed_target


@pytest.mark.parametrize(
    "target",
    [
        "statplug.recipes.TabularMLP",
        "statplug.recipes.tabular.TabularMLP",
        "statplug.lightning.callbacks.SyncStats",
        "statplug.RunningNorm",
        "lightning.pytorch.Trainer",
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.loggers.csv_logs.CSVLogger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning.pytorch.callbacks.early_stopping.EarlyStopping",
        "torchmetrics.MeanMetric",
        "torchmetrics.classification.MulticlassAccuracy",
    ],
)
def test_statplug_classes_and_the_allowlist_are_allowed(target: str) -> None:
    assert is_allowed_target(target)


@pytest.mark.parametrize(
    "target",
    [
        "builtins.open",
        "os.system",
        "shutil.copyfile",
        "torch.save",
        "numpy.savetxt",
        "statplugx.evil.Model",  # a prefix is not a package
        "statplug.inspect.checkpoint.torch.load",  # through an attribute of a statplug module
        "statplug.inspect.checkpoint.torch.nn.Linear",  # a class, but not statplug's
        "statplug.inspect.checkpoint.Path",  # re-exported foreign class
        "statplug.inspect.checkpoint.load_checkpoint",  # a statplug function, not a class
        "statplug.cli.main",
        "statplug._buffers.PinnedDtypeModule",  # private module
        "statplug.inspect.checkpoint.__builtins__",
        "statplug.config",  # a module
        "lightning.pytorch.Trainer.__init__.__globals__",
        "lightning.pytorch.callbacks.ModelCheckpoint.__init__",  # not a class
        "lightning.pytorch.callbacks.model_checkpoint.Path",  # a foreign class re-exported
        "lightning.pytorch.callbacks.model_checkpoint.torch.save",  # through an attribute
        "lightning.pytorch.loggers.logger.rank_zero_only",  # a function
        "lightning.pytorch.loggers.Logger.__init__.__globals__",
        "lightning.pytorch.core.LightningModule",  # outside the allowed packages
        "lightning.pytorch.callbacksx.Evil",
        "torchmetrics.functional.accuracy",  # a function
        "torchmetrics.utilities.data.Tensor",  # not a Metric
        "",
        123,
        None,
    ],
)
def test_everything_else_is_refused(target: object) -> None:
    assert not is_allowed_target(target)


def test_refusal_names_the_key_the_target_and_trust() -> None:
    cfg = {
        "model": {"_target_": "statplug.recipes.TabularMLP", "n_features": 3},
        "trainer": {"logger": {"_target_": "statplug.recipes.TabularMLP",
                               "x": [{"y": {"_target_": "shutil.rmtree", "path": "/"}}]}},
    }
    where = r"`trainer\.logger\.x\.0\.y\._target_`"
    with pytest.raises(ConfigError, match=where + r".*shutil\.rmtree.*in x\.ckpt.*--trust"):
        check_targets(cfg, origin="the config in x.ckpt")
    check_targets({"model": {"_target_": "statplug.recipes.TabularMLp"}})  # a typo: validation


def test_build_node_refuses_unless_trusted(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    node = {"_target_": "pathlib.Path.touch", "self": str(victim)}
    with pytest.raises(ConfigError, match="--trust"):
        build_node(node, "model")
    assert not victim.exists()


@pytest.mark.parametrize(
    "text", ["${oc.env:HOME}", "a\\${x}", "a\\\\${x}", "${a", "plain", "\\ ${x}${y}", "$x {y}"]
)
def test_escaped_strings_resolve_to_themselves(text: str) -> None:
    cfg = OmegaConf.create({"v": escape_interpolations([text])})
    assert OmegaConf.to_container(cfg, resolve=True) == {"v": [text]}


def test_a_resolved_string_is_not_resolved_again_when_built(tmp_path: Path) -> None:
    """Hydra resolves interpolations once more when it instantiates: the escaped YAML string
    below is text after the first resolution and must stay text, not build builtins.open."""
    victim = tmp_path / "victim.txt"
    payload = f"{{_target_: builtins.open, file: {victim}, mode: w}}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "callbacks:\n  activations:\n    _target_: statplug.lightning.callbacks.ActivationStats\n"
        f"    patterns: ['\\${{oc.create:{payload}}}']\n"
        "model:\n  _target_: statplug.recipes.TabularMLP\n  n_features: 3\n"
        "data:\n  _target_: statplug.recipes.SklearnDataModule\n"
    )
    run = load_recipe(recipe)  # the user's own file: what it says, escaped text stays text
    literal = f"${{oc.create:{payload}}}"
    node = run.config["callbacks"]["activations"]
    assert node["patterns"] == [literal]
    with pytest.raises(ConfigError, match=r"`callbacks\.activations\.patterns\.0`.*--trust"):
        build_node(node, "callbacks.activations")
    assert not victim.exists()
    # Trusted, the text arrives as written, wherever Hydra reads it from.
    for where in ({"patterns": [literal]}, {"patterns": [literal], "_recursive_": False}):
        callback = build_node({**node, **where}, "callbacks.activations", trust=True)
        assert list(callback.patterns) == [literal]
    assert build_node(
        {"_target_": "builtins.dict", "a": literal, "b": {"c": [literal]}}, "x", trust=True
    ) == {"a": literal, "b": {"c": [literal]}}
    assert not victim.exists()
