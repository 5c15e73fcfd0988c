"""`statplug --version`, `fit --progress`, `trainer.default_root_dir`, trainer presets with
`_target_`, and the Python API `run_recipe`."""

from __future__ import annotations

import csv
import io
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
from audit_models import ThreadProbe
from cli_helpers import SHORT, Result, run_inprocess, run_subprocess
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from omegaconf import OmegaConf

import statplug
from statplug.config import ConfigError, load_recipe

QUIET = [
    *SHORT, "trainer.logger=false", "trainer.enable_checkpointing=false", "callbacks.monitor=null"
]


def test_version_names_statplug_torch_and_lightning(tmp_path: Path) -> None:
    res = run_subprocess(["--version"], tmp_path)
    assert res.code == 0, res.err
    line = res.out.strip()
    assert line.startswith(f"statplug {statplug.__version__} (")
    assert f"torch {metadata.version('torch')}" in line
    assert f"lightning {metadata.version('lightning')}" in line
    assert statplug.__version__ == metadata.version("statplug")  # one source of the version


def test_default_root_dir_holds_the_logs_and_checkpoints(tmp_path: Path) -> None:
    cwd, root = tmp_path / "cwd", tmp_path / "runs"
    cwd.mkdir()
    res = run_inprocess(["fit", "tabular", *SHORT, f"trainer.default_root_dir={root}"], cwd)
    assert res.code == 0, res.err[-3000:]
    assert Path(res.last_line).is_relative_to(root.resolve())
    assert list(cwd.iterdir()) == []  # nothing written to the working directory
    metrics = list(root.glob("lightning_logs/version_*/metrics.csv"))
    assert len(metrics) == 1
    with metrics[0].open() as f:
        rows = list(csv.DictReader(f))
    # The default callback stack's StatsMonitor logged the normaliser once, at the epoch end.
    logged = [r for r in rows if r.get("stats/norm/count")]
    assert len(logged) == 1 and float(logged[0]["stats/norm/count"]) == 3 * 32


def test_trainer_presets_instantiate_to_a_trainer() -> None:
    for preset in ("cpu", "ddp-cpu-2"):
        cfg = OmegaConf.create(load_recipe("tabular", [f"trainer={preset}"]).config)
        trainer = instantiate(cfg.trainer, devices=1, strategy="auto")
        assert isinstance(trainer, Trainer)


def test_a_trainer_target_that_is_not_a_trainer_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"`trainer._target_`: expected lightning.pytorch"):
        load_recipe("tabular", ["trainer._target_=collections.OrderedDict"], trust=True)
    # An override is the user's own: the same check, with or without --trust.
    with pytest.raises(ConfigError, match=r"`trainer._target_`: expected lightning.pytorch"):
        load_recipe("tabular", ["trainer._target_=collections.OrderedDict"])


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fit_stderr(args: list[str], tmp_path: Path, tty: bool) -> Result:
    import contextlib
    import os

    from statplug.cli import main

    out, err = io.StringIO(), (_TTY() if tty else io.StringIO())
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["fit", "tabular", *QUIET, *args])
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())


BAR = re.compile(r"Epoch 0: 100%\|")


@pytest.mark.parametrize(
    ("args", "tty", "shown"),
    [([], True, True), ([], False, False), (["--progress"], False, True),
     (["--no-progress"], True, False)],
)
def test_progress_bar_on_stderr_when_it_is_a_terminal(
    tmp_path: Path, args: list[str], tty: bool, shown: bool
) -> None:
    res = _fit_stderr(args, tmp_path, tty)
    assert res.code == 0, res.err[-3000:]
    assert bool(BAR.search(res.err)) is shown, res.err[-2000:]
    assert not BAR.search(res.out)  # stdout carries the result only


def test_run_recipe_returns_the_fitted_run_and_honours_seed_and_threads(tmp_path: Path) -> None:
    probe = ["+callbacks.probe={_target_: audit_models.ThreadProbe}"]
    before = torch.get_num_threads()
    ThreadProbe.seen.clear()
    runs = [
        statplug.run_recipe(
            "tabular", [*QUIET, f"trainer.default_root_dir={tmp_path / str(i)}", "num_threads=1",
                        f"seed={seed}", *probe], progress=False, trust=True,
        )
        for i, seed in enumerate((3, 3, 4))
    ]
    assert ThreadProbe.seen == [1, 1, 1]
    assert torch.get_num_threads() == before  # restored after each run
    a, b, c = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    assert not all(torch.equal(a[k], c[k]) for k in a)
    first = runs[0]
    assert Path(first.checkpoint_path).is_file()
    assert Path(first.checkpoint_path).is_relative_to((tmp_path / "0").resolve())
    assert first.trainer.global_step == 3 and first.config["seed"] == 3
    assert type(first.datamodule).__name__ == "SklearnDataModule"
