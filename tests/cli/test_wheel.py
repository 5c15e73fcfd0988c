"""A built wheel carries the recipes and their fragments: `statplug fit` works after a pip install.

The wheel is built from a copy of the sources (the build writes `build/` and `*.egg-info` beside
them), installed without dependencies into a fresh venv that sees this interpreter's packages
(torch, Lightning ...) through a `.pth` line, so nothing is downloaded; then the venv's own
`statplug` runs in an empty folder with no `PYTHONPATH`, so only the installed files count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "statplug", "recipes", "configs")

pytestmark = pytest.mark.slow


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _build_wheel(tmp: Path) -> Path:
    """Built without isolation, by this environment's setuptools (the `dev` extra pins one new
    enough), so nothing is downloaded."""
    src = tmp / "src"
    for name in SOURCES:
        from_, to = REPO / name, src / name
        if from_.is_dir():
            shutil.copytree(from_, to, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(from_, to)
    dist = tmp / "dist"
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-index", "-q", "-w", str(dist), str(src)], tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = dist.glob("statplug-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp: Path) -> Path:
    """A fresh venv holding only the wheel; the dependencies come from this interpreter."""
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp).stdout.strip()
    deps = {p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")}
    # Plain path lines: appended after the venv's own site-packages, and the editable install
    # of the source tree (a `.pth` that runs code) in that folder is not run from here.
    (Path(purelib) / "zz_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    res = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                "--no-index", "-q", str(wheel)], tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return env_dir


def test_statplug_fit_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    env_dir = _venv_with(_build_wheel(tmp_path), tmp_path)
    work = tmp_path / "empty"
    work.mkdir()
    where = _run([str(env_dir / "bin" / "python"), "-c",
                  "import statplug.recipes, statplug.configs as c; "
                  "print(statplug.recipes.__file__); print(c.__file__)"], work)
    assert where.returncode == 0, where.stderr[-3000:]
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(env_dir.resolve()), line

    statplug = str(env_dir / "bin" / "statplug")
    listed = _run([statplug, "recipes"], work)
    assert listed.returncode == 0, listed.stderr[-3000:]
    names = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert names == {"digits", "pruning", "tabular", "tinylm"}

    fit = _run([statplug, "fit", "tabular", "trainer.max_epochs=1"], work)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = Path(fit.stdout.strip().splitlines()[-1])
    assert ckpt.is_file() and ckpt.resolve().is_relative_to(work.resolve())
    assert "recipe: tabular (" + str(env_dir.resolve()) in fit.stdout  # the installed recipe
