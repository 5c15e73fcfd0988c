"""Run the `statplug` command in-process or as a subprocess, capturing its output."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from statplug.cli import main

REPO = Path(__file__).resolve().parents[2]
# A few steps of each recipe: one short epoch, so epoch-end hooks (sync, pruning, checkpoint) run.
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        lines = self.out.strip().splitlines()
        return lines[-1] if lines else ""


def run_inprocess(argv: list[str], cwd: Path) -> Result:
    """``main(argv)`` in ``cwd`` with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = int(exc.code or 0)
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())


def statplug_command() -> list[str]:
    """The installed console script when there is one (as users run it), else ``-m``."""
    script = Path(sys.executable).parent / "statplug"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "statplug.cli"]


def run_subprocess(argv: list[str], cwd: Path, timeout: float = 180) -> Result:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [*statplug_command(), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_ddp_subprocess(argv: list[str], cwd: Path, timeout: float = 180) -> Result:
    """:func:`run_subprocess` for a multi-process DDP run, retried once if a process aborted.

    torch's gloo teardown aborts a DDP process now and then as it exits ("terminate called
    without an active exception"; see ``tests/dist_utils.py``). Only that signature is retried,
    once: any other failure, or a second abort, is returned as is.
    """
    res = run_subprocess(argv, cwd, timeout)
    if res.code != 0 and "terminate called without an active exception" in res.err:
        res = run_subprocess(argv, cwd, timeout)
    return res

