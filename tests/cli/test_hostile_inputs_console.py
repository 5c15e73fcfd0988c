"""Hostile files through the console script, as a user runs it, under resource limits.

Each case must exit 2 with exactly one line on stderr (nothing on stdout), write nothing outside
its output directory, and cost under 5 s of CPU and under 200 MB of memory beyond what importing
statplug costs (the baseline: a process that imports the command's modules and torch, ~230 MB;
a refusal must come before Lightning is imported, which alone would add ~180 MB).
An address-space limit stops a runaway case early instead of letting it swap the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import statplug_command
from hostile_files import (
    HOSTILE_OVERRIDES,
    REFUSED_CHECKPOINTS,
    STORED_CONFIG_KINDS,
    VICTIM,
    YAML_KINDS,
    Hostile,
    stored_config_checkpoint,
    yaml_file,
)

pytestmark = pytest.mark.slow

CPU_SECONDS = 5.0
EXTRA_MEMORY_MB = 200.0
_ADDRESS_SPACE = 4 << 30  # torch and Lightning reserve ~1 GB of address space on import
_WALL_SECONDS = 90.0  # a hang, not a slow machine
# What every statplug command imports before it reads its input (torch, OmegaConf, PyYAML).
_IMPORTS = "import statplug.cli, statplug.config.build, statplug.inspect.checkpoint"


@dataclass
class Measured:
    code: int
    out: str
    err: str
    cpu_seconds: float
    max_rss_mb: float


# Runs the command as its own child and reports that child's resource usage. The usage must come
# from a small parent: Linux counts the memory a process had when it was forked (and exec'd) in
# its peak RSS, so a child forked from pytest itself would report pytest's size.
_LAUNCHER = f"""
import json, os, resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, ({_ADDRESS_SPACE}, {_ADDRESS_SPACE}))
resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({{"cpu": usage.ru_utime + usage.ru_stime, "rss_kb": usage.ru_maxrss}}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> Measured:
    usage_path = cwd.parent / f".{cwd.name}.usage.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(usage_path), *cmd],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=_WALL_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{cmd} still running after {_WALL_SECONDS} s")
    usage = json.loads(usage_path.read_text())
    usage_path.unlink()
    return Measured(proc.returncode, out, err, usage["cpu"], usage["rss_kb"] / 1024)


def _env(tmp: Path) -> dict[str, str]:
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        # Anything a library would write for itself lands under the snapshot root.
        "HOME": str(home),
        "MPLCONFIGDIR": str(home / "mpl"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "TMPDIR": str(home),
    }


@pytest.fixture(scope="module")
def baseline_mb(tmp_path_factory: pytest.TempPathFactory) -> float:
    tmp = tmp_path_factory.mktemp("baseline")
    work = tmp / "work"
    work.mkdir()
    res = _run([sys.executable, "-c", _IMPORTS], work, _env(tmp))
    assert res.code == 0, res.err
    return res.max_rss_mb


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in root.rglob("*")
        if p != skip and skip not in p.parents and not p.name.endswith(".usage.json")
    }


def _check(argv: list[str], tmp: Path, says: str, baseline: float) -> None:
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    env = _env(tmp)
    before = _snapshot(tmp, out)
    res = _run([*statplug_command(), *argv], out, env)
    print(f"{argv[0]} {Path(argv[1]).name}: {res.cpu_seconds:.2f} s CPU, {res.max_rss_mb:.0f} MB")
    assert res.code == 2, (res.code, res.out[-2000:], res.err[-3000:])
    assert res.out == ""
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("statplug: error: "), res.err[-3000:]
    assert says.lower() in lines[0].lower(), lines[0]
    assert _snapshot(tmp, out) == before, "a file outside the output directory changed"
    assert not (tmp / VICTIM).exists() and not (out / VICTIM).exists()
    assert res.cpu_seconds < CPU_SECONDS, f"{res.cpu_seconds:.2f} s of CPU"
    extra = res.max_rss_mb - baseline
    assert extra < EXTRA_MEMORY_MB, f"{res.max_rss_mb:.0f} MB peak, {extra:.0f} MB over baseline"


def _file_case(command: str, build: Callable[[Path], Hostile]) -> Callable[[Path, float], None]:
    def run(tmp: Path, baseline: float) -> None:
        hostile = build(tmp)
        argv = [command, str(hostile.path)]
        if command == "plot":
            argv += ["-o", str(tmp / "out" / "stats.png")]
        _check(argv, tmp, hostile.says, baseline)

    return run


def _override_case(case: str) -> Callable[[Path, float], None]:
    def run(tmp: Path, baseline: float) -> None:
        overrides, says = HOSTILE_OVERRIDES[case]
        _check(["fit", "tabular", *overrides], tmp, says, baseline)

    return run


def _stored(kind: str) -> Callable[[Path], Hostile]:
    return lambda d: stored_config_checkpoint(d, kind)


def _yaml(kind: str) -> Callable[[Path], Hostile]:
    return lambda d: yaml_file(d, kind)


# Every hostile file once, and each command on a few more (the in-process tests run the full
# product of files and commands; each case here costs a process start, about a second of CPU).
_AUDITED = ("args_list", "partial")
CASES: dict[str, Callable[[Path, float], None]] = {
    **{f"inspect-{name}": _file_case("inspect", b) for name, b in REFUSED_CHECKPOINTS.items()},
    "plot-expanded_tensor": _file_case("plot", REFUSED_CHECKPOINTS["expanded_tensor"]),
    "audit-cyclic_list": _file_case("audit", REFUSED_CHECKPOINTS["cyclic_list"]),
    **{
        f"{'audit' if k in _AUDITED else 'fit'}-config_{k}": _file_case(
            "audit" if k in _AUDITED else "fit", _stored(k)
        )
        for k in STORED_CONFIG_KINDS
    },
    **{f"fit-yaml_{k}": _file_case("fit", _yaml(k)) for k in YAML_KINDS},
    **{f"fit-override_{c}": _override_case(c) for c in ("group_path", "misspelled_null")},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_console_refuses_hostile_input_within_budget(
    case: str, tmp_path: Path, baseline_mb: float
) -> None:
    CASES[case](tmp_path, baseline_mb)


def test_the_limits_measure_a_runaway(tmp_path: Path) -> None:
    """The harness itself: a process that allocates 400 MB is seen over the budget."""
    work = tmp_path / "work"
    work.mkdir()
    res = _run([sys.executable, "-c", "b = bytearray(400 << 20)"], work, _env(tmp_path))
    assert res.code == 0, res.err
    assert res.max_rss_mb > 400
