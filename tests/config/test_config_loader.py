"""Recipe composition, overrides and validation (no training)."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from statplug.config import (
    ConfigError,
    bundled_configs_dir,
    bundled_recipes,
    bundled_recipes_dir,
    compose,
    load_recipe,
    to_plain,
)
from statplug.config.errors import closest
from statplug.config.loader import parse_overrides, parse_yaml

REPO = Path(__file__).resolve().parents[2]
RECIPES = ("digits", "pruning", "tabular", "tinylm")
TABULAR = REPO / "recipes" / "tabular.yaml"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- bundled files
def test_bundled_recipes_are_found_and_listed() -> None:
    assert set(bundled_recipes()) == set(RECIPES)
    assert (bundled_configs_dir() / "trainer" / "cpu.yaml").is_file()
    assert (bundled_configs_dir() / "trainer" / "ddp-cpu-2.yaml").is_file()


def _setuptools_table() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return dict(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"])


def test_recipes_and_configs_are_top_level_and_mapped_into_the_package() -> None:
    """One source: `recipes/` and `configs/` at the top, installed as statplug.recipes/.configs."""
    table = _setuptools_table()
    assert table["package-dir"] == {"statplug.recipes": "recipes", "statplug.configs": "configs"}
    assert bundled_recipes_dir().resolve() == (REPO / "recipes").resolve()
    assert bundled_configs_dir().resolve() == (REPO / "configs").resolve()
    assert not (REPO / "statplug" / "recipes").exists()
    assert not (REPO / "statplug" / "configs").exists()
    for folder in ("statplug", "recipes", "configs"):
        assert not any(p.is_symlink() for p in (REPO / folder).rglob("*"))


def test_package_data_globs_cover_configs_and_recipes() -> None:
    """pyproject's package-data patterns ship every bundled YAML file with a pip install."""
    table = _setuptools_table()
    shipped = set()
    for package, patterns in table["package-data"].items():
        folder = REPO / table["package-dir"].get(package, package.replace(".", "/"))
        for pat in patterns:
            shipped |= {Path(p).resolve() for p in glob.glob(str(folder / pat), recursive=True)}
    bundled = {p.resolve() for d in ("recipes", "configs") for p in (REPO / d).rglob("*.yaml")}
    assert bundled and bundled <= shipped


def test_every_package_on_disk_is_listed() -> None:
    """Packages are listed in pyproject (a mapped folder defeats `packages.find`): a new
    subpackage of statplug that is not listed would be missing from the wheel."""
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "statplug").rglob("__init__.py")
    }
    listed = set(_setuptools_table()["packages"])
    assert on_disk <= listed, sorted(on_disk - listed)
    assert {"statplug.recipes", "statplug.configs"} <= listed


def test_configs_naming_the_old_recipes_module_still_build() -> None:
    """Configs stored before the recipes' models moved to `statplug.recipes` name
    `statplug.recipes_lib`: they are read with the new module paths."""
    run = load_recipe("tabular", ["model._target_=statplug.recipes_lib.tabular.TabularMLP"])
    assert run.config["model"]["_target_"] == "statplug.recipes.tabular.TabularMLP"


@pytest.mark.parametrize("name", RECIPES)
def test_every_bundled_recipe_validates(name: str) -> None:
    run = load_recipe(name)
    assert run.config["model"]["_target_"].startswith("statplug.recipes.")
    assert run.config["trainer"]["accelerator"] == "cpu"
    assert "sync" in run.config["callbacks"]  # SyncStats in every recipe's stack
    assert isinstance(run.config["description"], str) and run.config["description"]


# ----------------------------------------------------------------------------- composition
def test_fragments_then_recipe_then_overrides() -> None:
    run = load_recipe("tabular", ["trainer.max_epochs=3", "model.lr=1e-3"])
    trainer = run.config["trainer"]
    assert trainer["devices"] == 1  # from configs/trainer/cpu.yaml
    assert trainer["max_epochs"] == 3  # the override beats the recipe's 15
    assert run.config["model"]["lr"] == pytest.approx(1e-3)  # YAML 1.2 float
    assert run.config["callbacks"]["sync"]["_target_"].endswith("SyncStats")


def test_group_selection_keeps_recipe_keys() -> None:
    run = load_recipe("tabular", ["trainer=ddp-cpu-2"])
    trainer = run.config["trainer"]
    assert (trainer["strategy"], trainer["devices"]) == ("ddp", 2)
    assert trainer["max_epochs"] == 15  # the recipe's own value still wins over the fragment


def test_callback_can_be_disabled_with_null() -> None:
    run = load_recipe("tabular", ["callbacks.audit=null"])
    assert run.config["callbacks"]["audit"] is None
    assert run.config["callbacks"]["sync"] is not None


def test_unknown_callback_names_are_errors_whatever_their_value(tmp_path: Path) -> None:
    misspelled = ("callbacks.audt=null", "callbacks.syn=3", "callbacks.syn.every_n_train_steps=2")
    for override in misspelled:
        with pytest.raises(ConfigError, match=r"unknown key `callbacks\.\w+.*did you mean"):
            load_recipe("tabular", [override])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        (TABULAR).read_text() + "callbacks:\n  audt: null\n"
    )
    with pytest.raises(ConfigError, match=r"`callbacks\.audt`; did you mean `callbacks\.audit`"):
        load_recipe(recipe)


def test_a_new_callback_comes_with_its_target() -> None:
    run = load_recipe(
        "tabular",
        [
            "callbacks.extra={_target_: statplug.lightning.callbacks.SyncStats}",
            "callbacks.extra.every_n_train_steps=2",
        ],
    )
    assert run.config["callbacks"]["extra"]["every_n_train_steps"] == 2
    run = load_recipe("tabular", ["callbacks=none", "callbacks.sync={_target_: "
                                  "statplug.lightning.callbacks.SyncStats}"])
    assert list(run.config["callbacks"]) == ["sync"]


@pytest.mark.parametrize("override", ["trainer=../configs/trainer/cpu", "trainer=cpu.yaml",
                                      "callbacks=/etc/x", "trainer=cpu/../cpu"])
def test_group_names_are_names_not_paths(override: str) -> None:
    with pytest.raises(ConfigError, match="not a path"):
        load_recipe("tabular", [override])


def test_yaml_aliases_and_deep_nesting_are_refused() -> None:
    with pytest.raises(Exception, match="aliases"):
        parse_yaml("a: &x [1]\nb: *x\n")
    with pytest.raises(Exception, match="nested more than"):
        parse_yaml("a: " + "[" * 100 + "]" * 100)
    assert parse_yaml("a: &x [1]\n") == {"a": [1]}  # an anchor alone is harmless


def test_interpolation_is_resolved_in_the_plain_copy() -> None:
    run = load_recipe("tinylm", ["data.vocab_size=20"])
    assert run.config["model"]["vocab_size"] == 20


def test_plain_copy_has_only_python_types() -> None:
    run = load_recipe("digits")

    def walk(x: object) -> None:
        assert x is None or isinstance(x, bool | int | float | str | list | dict), type(x)
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(run.config)
    assert to_plain(OmegaConf.create({"a": "${b}", "b": 1})) == {"a": 1, "b": 1}


def test_local_configs_folder_beside_recipe_wins(tmp_path: Path) -> None:
    (tmp_path / "configs" / "trainer").mkdir(parents=True)
    _write(tmp_path / "configs" / "trainer" / "tiny.yaml", "accelerator: cpu\nmax_steps: 2\n")
    (tmp_path / "recipes").mkdir()
    src = (TABULAR).read_text()
    mine = src.replace("trainer: cpu", "trainer: tiny")
    recipe = _write(tmp_path / "recipes" / "mine.yaml", mine)
    run = load_recipe(recipe)
    assert run.config["trainer"]["max_steps"] == 2
    assert run.config["callbacks"]["sync"] is not None  # bundled callbacks/stats.yaml still found


def test_defaults_may_be_a_mapping(tmp_path: Path) -> None:
    recipe = _write(
        tmp_path / "r.yaml",
        "defaults: {trainer: cpu}\nmodel: {_target_: statplug.recipes.TabularMLP, "
        "n_features: 3}\ndata: {_target_: statplug.recipes.SklearnDataModule}\n",
    )
    assert load_recipe(recipe).config["trainer"]["accelerator"] == "cpu"


# ----------------------------------------------------------------------------- overrides
def test_parse_overrides_splits_groups_and_keys() -> None:
    selections, assignments = parse_overrides(
        ["trainer=ddp-cpu-2", "trainer.max_steps=5", "model.channels=[8, 16]", "seed=null"],
        {"trainer", "callbacks"},
    )
    assert selections == {"trainer": "ddp-cpu-2"}
    assert assignments == [
        ("trainer.max_steps", 5),
        ("model.channels", [8, 16]),
        ("seed", None),
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("3", 3), ("1.5", 1.5), ("-2e+4", -2e4), ("abc", "abc"), ("true", True)],
)
def test_yaml_values(text: str, value: object) -> None:
    assert parse_yaml(text) == value


def test_closest() -> None:
    assert closest("max_epoch", ["max_epochs", "min_epochs", "max_steps"]) == "max_epochs"
    assert closest("zzzz", ["max_epochs"]) is None


# ----------------------------------------------------------------------------- errors
def _error(recipe: str | Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_trainer_key_suggests_closest() -> None:
    msg = _error("tabular", "trainer.max_epoch=1")
    assert "`trainer.max_epoch`" in msg and "`trainer.max_epochs`" in msg
    assert "command-line override" in msg


def test_unknown_model_key_in_recipe_file_names_the_file(tmp_path: Path) -> None:
    src = (TABULAR).read_text().replace("hidden: 64", "hiden: 64")
    recipe = _write(tmp_path / "typo.yaml", src)
    msg = _error(recipe)
    assert "`model.hiden`" in msg and "`model.hidden`" in msg and "typo.yaml" in msg


def test_unknown_callback_key_and_top_level_key() -> None:
    msg = _error("tabular", "callbacks.sync.every_n_train_step=2")
    assert "`callbacks.sync.every_n_train_steps`" in msg
    msg = _error("tabular", "sede=1")
    assert "`sede`" in msg and "`seed`" in msg


def test_bad_value_types() -> None:
    assert "expected int" in _error("tabular", "trainer.max_epochs=abc")
    assert "expected int" in _error("tabular", "trainer.max_epochs=1.5")
    assert "expected int" in _error("tabular", "model.hidden=wide")
    assert "one of" in _error("tabular", "data.dataset=mnist")
    assert "expected int or null" in _error("tabular", "seed=abc")


def test_missing_and_bundled_name_errors(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nope.yaml")
    assert "not found" in msg and "nope.yaml" in msg
    assert "`tabular`" in _error("tabulr")


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "bad.yaml", "model:\n  _target_: x\n  a: [1, 2\nb: 3\n")
    msg = _error(recipe)
    assert "bad.yaml" in msg and "line 4" in msg


def test_unknown_fragment_and_target() -> None:
    msg = _error("tabular", "trainer=ddp-cpu-3")
    assert "`ddp-cpu-2`" in msg
    msg = _error("tabular", "model._target_=statplug.recipes.TabularMLp")
    assert "`statplug.recipes.TabularMLP`" in msg


def test_missing_required_constructor_argument(tmp_path: Path) -> None:
    src = (TABULAR).read_text().replace("  n_features: 30\n", "")
    msg = _error(_write(tmp_path / "r.yaml", src))
    assert "`model.n_features`" in msg


def test_malformed_override() -> None:
    assert "key=value" in _error("tabular", "trainer.max_epochs")


def test_compose_keeps_track_of_overrides() -> None:
    recipe = compose("tabular", ["trainer.max_steps=4", "trainer=ddp-cpu-2"])
    assert recipe.overridden == {"trainer.max_steps"}
    assert recipe.fragments == {"trainer": "ddp-cpu-2", "callbacks": "stats"}
