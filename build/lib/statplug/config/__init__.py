"""Recipes and configs: OmegaConf composition, validation, and ``_target_`` instantiation.

>>> from statplug.config import load_recipe
>>> run = load_recipe("tabular", ["trainer.max_epochs=1"])
>>> run.config["trainer"]["max_epochs"]
1
"""

from statplug.config.build import Built, Run, build, build_node, load_recipe
from statplug.config.errors import ConfigError
from statplug.config.loader import (
    Recipe,
    bundled_configs_dir,
    bundled_recipes,
    bundled_recipes_dir,
    compose,
    find_recipe,
    to_plain,
)
from statplug.config.validate import validate

__all__ = [
    "Built",
    "ConfigError",
    "Recipe",
    "Run",
    "build",
    "build_node",
    "bundled_configs_dir",
    "bundled_recipes",
    "bundled_recipes_dir",
    "compose",
    "find_recipe",
    "load_recipe",
    "to_plain",
    "validate",
]
