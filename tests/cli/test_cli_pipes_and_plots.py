"""`statplug inspect | head` ends quietly; `plot` warns when checkpoints are different runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run_subprocess, statplug_command

from statplug import RunningMoments

pytest.importorskip("matplotlib")


def _checkpoint(path: Path, n: int, step: int, config: dict[str, Any] | None = None) -> Path:
    """A checkpoint holding one stat that has seen ``n`` rows, at global step ``step``."""
    stat = RunningMoments(3)
    stat.update(torch.randn(n, 3, generator=torch.Generator().manual_seed(n)))
    obj: dict[str, Any] = {
        "state_dict": {f"norm.{k}": v for k, v in stat.state_dict().items()},
        "global_step": step,
        "epoch": 0,
    }
    if config is not None:
        obj["statplug"] = {"version": 1, "stats": [], "masks": [], "encodings": [],
                           "config": config}
    torch.save(obj, path)
    return path


def test_inspect_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    config = {"description": "x" * 200, "model": {f"k{i}": "v" * 100 for i in range(400)}}
    ckpt = _checkpoint(tmp_path / "big.ckpt", 20, 5, config)  # --config prints ~50 KB
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*statplug_command(), "inspect", str(ckpt), "--config"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()  # `| head -n 1`: one line read, then the pipe is closed
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == "" and proc.returncode == 141  # as a shell reports a tool ended by SIGPIPE


@pytest.mark.parametrize(
    ("pairs", "says"),
    [
        ([(40, 10), (20, 20)], "the count of `norm` goes from 40"),  # fewer samples later
        ([(20, 10), (40, 10)], "the count of `norm` goes from 20"),  # one step, two counts
    ],
)
def test_plot_warns_when_counts_say_different_runs(
    pairs: list[tuple[int, int]], says: str, tmp_path: Path
) -> None:
    files = [str(_checkpoint(tmp_path / f"c{i}.ckpt", n, s)) for i, (n, s) in enumerate(pairs)]
    res = run_subprocess(["plot", *files, "-o", str(tmp_path / "t.png")], tmp_path)
    assert res.code == 0, res.err[-3000:]
    warnings = [line for line in res.err.splitlines() if line.startswith("statplug: warning:")]
    assert len(warnings) == 1 and "different runs" in warnings[0] and says in warnings[0]
    assert "c0.ckpt" in warnings[0] and "c1.ckpt" in warnings[0]
    assert (tmp_path / "t.png").stat().st_size > 0  # still drawn


def test_plot_warns_when_configs_say_different_runs(tmp_path: Path) -> None:
    a = _checkpoint(tmp_path / "a.ckpt", 20, 10, {"model": {"hidden": 8}, "seed": 0})
    b = _checkpoint(tmp_path / "b.ckpt", 40, 20, {"model": {"hidden": 16}, "seed": 0})
    res = run_subprocess(["plot", str(a), str(b), "-o", str(tmp_path / "t.png")], tmp_path)
    assert res.code == 0, res.err[-3000:]
    assert "differ in `model`" in res.err and res.err.count("statplug: warning:") == 1


def test_plot_of_one_run_says_nothing(tmp_path: Path) -> None:
    cfg = {"model": {"hidden": 8}, "seed": 0, "trainer": {"max_epochs": 1}}
    files = [
        _checkpoint(tmp_path / "a.ckpt", 20, 10, cfg),
        # resumed with more epochs: the trainer section may change within a run
        _checkpoint(tmp_path / "b.ckpt", 40, 20, {**cfg, "trainer": {"max_epochs": 2}}),
    ]
    res = run_subprocess(["plot", *map(str, files), "-o", str(tmp_path / "t.png")], tmp_path)
    assert res.code == 0 and "warning" not in res.err, res.err[-3000:]
