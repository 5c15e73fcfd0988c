"""Without the `recipes` extra (scikit-learn, matplotlib): the core works, fit/plot say what to
install in one line.

Every process runs with a ``sitecustomize`` on ``PYTHONPATH`` that makes ``sklearn`` and
``matplotlib`` unimportable and their package metadata invisible, as in an environment where
``pip install statplug`` left them out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import REPO, Result, statplug_command

BLOCKER = '''
import importlib.metadata as metadata
import sys

# None in sys.modules is Python's own "not importable": `import sklearn` raises
# ModuleNotFoundError and importlib.util.find_spec("sklearn") returns None, as when it is absent.
for name in ("sklearn", "matplotlib"):
    sys.modules[name] = None

# Their distributions are hidden too: libraries ask the metadata whether a package is installed
# (torchmetrics imports matplotlib when its metadata is found).
_HIDDEN = {"scikit-learn", "scikit_learn", "matplotlib"}
_find = metadata.MetadataPathFinder.find_distributions.__func__


def _find_visible(cls, context=metadata.DistributionFinder.Context()):
    for dist in _find(cls, context):
        if (dist.metadata["Name"] or "").lower() not in _HIDDEN:
            yield dist


metadata.MetadataPathFinder.find_distributions = classmethod(_find_visible)
'''

FIT = textwrap.dedent('''
    import sys
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from lit_models import QUIET, TinyModel, loader, make_data
    import statplug
    from statplug import ActivationStats, AuditBuffers, StatsMonitor, SyncStats

    for name in ("sklearn", "matplotlib"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"{name} is importable: the sitecustomize did not work")
    callbacks = [SyncStats(), AuditBuffers(), ActivationStats(["net.*"]),
                 StatsMonitor(logging_interval="epoch")]
    trainer = pl.Trainer(max_epochs=2, callbacks=callbacks, default_root_dir=sys.argv[1],
                         **{**QUIET, "logger": CSVLogger(sys.argv[1])})
    trainer.fit(TinyModel(), loader(*make_data(32)))
    trainer.save_checkpoint(sys.argv[1] + "/model.ckpt")
    assert float(trainer.callback_metrics["stats/norm/count"]) == 64
    print("ok", statplug.__version__)
''')


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    hook = tmp_path_factory.mktemp("no_extra")
    (hook / "sitecustomize.py").write_text(BLOCKER)
    paths = [str(hook), str(REPO), str(REPO / "tests" / "lightning")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> Result:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_core_callbacks_and_inspect_work_without_the_extra(
    tmp_path: Path, env: dict[str, str]
) -> None:
    res = _run([sys.executable, "-c", FIT, str(tmp_path)], tmp_path, env)
    assert res.code == 0 and res.out.startswith("ok"), res.out + res.err[-3000:]
    res = _run([*statplug_command(), "inspect", str(tmp_path / "model.ckpt")], tmp_path, env)
    assert res.code == 0, res.err
    assert "norm.moments" in res.out and "ActivationStats:net.0.moments" in res.out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "package"),
    [(["fit", "tabular"], "scikit-learn"), (["plot", "model.ckpt", "-o", "x.png"], "matplotlib")],
)
def test_fit_and_plot_name_the_extra_in_one_line(
    tmp_path: Path, env: dict[str, str], argv: list[str], package: str
) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"")  # plot must fail on the extra before the file
    res = _run([*statplug_command(), *argv], tmp_path, env)
    assert res.code == 2, res.out + res.err
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert package in lines[0] and "pip install 'statplug[recipes]'" in lines[0]
    assert not (tmp_path / "lightning_logs").exists()  # stopped before training started
