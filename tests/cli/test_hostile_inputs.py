"""Hostile files and command lines: a table, or exit 2 with one line; never code, hangs or writes.

Every case runs the real command in-process here (fast, all commands). The same files run through
the console script under resource limits in ``test_hostile_inputs_console.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_helpers import Result, run_inprocess
from hostile_files import (
    HOSTILE_OVERRIDES,
    MALFORMED_KINDS,
    REFUSED_CHECKPOINTS,
    STORED_CONFIG_KINDS,
    VICTIM,
    YAML_KINDS,
    malformed_checkpoint,
    stored_config_checkpoint,
    yaml_file,
)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` but ``skip``: (size, mtime_ns)."""
    out = {}
    for p in root.rglob("*"):
        if skip in p.parents or p == skip:
            continue
        st = p.lstat()
        out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _argv(command: str, target: Path, out: Path) -> list[str]:
    png = ["-o", str(out / "stats.png")]
    return {
        "plot": ["plot", str(target), *png],
        "plot-over-time": ["plot", str(target), str(target), *png],  # two checkpoints
        "inspect-json": ["inspect", str(target), "--json"],
        "inspect-config": ["inspect", str(target), "--config"],
        "inspect-json-config": ["inspect", str(target), "--json", "--config"],
    }.get(command, [command, str(target)])


_READERS = ["inspect", "inspect-json", "inspect-config", "inspect-json-config", "plot",
            "plot-over-time"]


def _run_in(out: Path, argv: list[str], root: Path) -> Result:
    """Run ``argv`` with ``out`` as working directory; nothing outside it may change."""
    out.mkdir(exist_ok=True)
    before = _snapshot(root, out)
    res = run_inprocess(argv, out)
    assert _snapshot(root, out) == before, "a file outside the output directory changed"
    assert not (root / VICTIM).exists() and not (out / VICTIM).exists()
    return res


def _assert_one_line(res: Result, says: str) -> str:
    assert res.code == 2, (res.code, res.out[-2000:], res.err[-2000:])
    assert res.out == ""
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("statplug: error: "), res.err[-3000:]
    assert not _CONTROL.search(lines[0])
    assert says.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.mark.parametrize("command", [*_READERS, "fit", "audit"])
@pytest.mark.parametrize("case", sorted(REFUSED_CHECKPOINTS))
def test_refused_checkpoints(case: str, command: str, tmp_path: Path) -> None:
    hostile = REFUSED_CHECKPOINTS[case](tmp_path)
    out = tmp_path / "out"
    line = _assert_one_line(_run_in(out, _argv(command, hostile.path, out), tmp_path), hostile.says)
    if case != "pickled_object":
        assert "--trust" not in line  # trusting a file does not make it a checkpoint


def test_text_and_random_bytes_say_not_a_checkpoint(tmp_path: Path) -> None:
    """The two messages of the issue: no meaningless number, no --trust suggestion."""
    for case in ("text_file", "random_bytes"):
        hostile = REFUSED_CHECKPOINTS[case](tmp_path)
        line = _assert_one_line(run_inprocess(["inspect", str(hostile.path)], tmp_path), "")
        assert "is not a torch checkpoint" in line and "--trust" not in line, line


@pytest.mark.parametrize("command", _READERS)
@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_malformed_stats_give_a_table_or_one_line(kind: str, command: str, tmp_path: Path) -> None:
    path = malformed_checkpoint(tmp_path, kind)
    out = tmp_path / "out"
    res = _run_in(out, _argv(command, path, out), tmp_path)
    assert "Traceback" not in res.err
    if res.code == 2:  # over time, the line speaks of the checkpoints together
        _assert_one_line(res, path.name if command != "plot-over-time" else "checkpoints")
        return
    assert res.code == 0, res.err[-3000:]
    assert not _CONTROL.search(res.out.replace("\n", ""))  # no terminal escapes from key names
    if command == "inspect":
        assert res.out.startswith(f"checkpoint: {path}")
    elif command.startswith("plot"):
        assert (out / "stats.png").stat().st_size > 0


@pytest.mark.parametrize("command", _READERS)
@pytest.mark.parametrize("kind", STORED_CONFIG_KINDS)
def test_hostile_stored_configs_are_only_read(kind: str, command: str, tmp_path: Path) -> None:
    """inspect and plot show a stored config (`--config`), whatever it names: never build it."""
    hostile = stored_config_checkpoint(tmp_path, kind)
    out = tmp_path / "out"
    res = _run_in(out, _argv(command, hostile.path, out), tmp_path)
    assert res.code == 0, res.err[-3000:]
    assert not _CONTROL.search(res.out.replace("\n", ""))


@pytest.mark.parametrize("kind", MALFORMED_KINDS[:3])
def test_malformed_checkpoints_cannot_be_rerun(kind: str, tmp_path: Path) -> None:
    path = malformed_checkpoint(tmp_path, kind)
    _assert_one_line(_run_in(tmp_path / "out", ["fit", str(path)], tmp_path), "no recipe config")


@pytest.mark.parametrize("command", ["fit", "audit"])
@pytest.mark.parametrize("kind", STORED_CONFIG_KINDS)
def test_stored_config_runs_no_foreign_target(kind: str, command: str, tmp_path: Path) -> None:
    hostile = stored_config_checkpoint(tmp_path, kind)
    res = _run_in(tmp_path / "out", [command, str(hostile.path)], tmp_path)
    line = _assert_one_line(res, hostile.says)
    assert "--trust" in line and "_target_" in line


@pytest.mark.parametrize("command", ["fit", "audit"])
@pytest.mark.parametrize("kind", YAML_KINDS)
def test_hostile_yaml(kind: str, command: str, tmp_path: Path) -> None:
    hostile = yaml_file(tmp_path, kind)
    res = _run_in(tmp_path / "out", [command, str(hostile.path)], tmp_path)
    _assert_one_line(res, hostile.says)


@pytest.mark.parametrize("command", ["fit", "audit"])
@pytest.mark.parametrize("case", sorted(HOSTILE_OVERRIDES))
def test_hostile_overrides(case: str, command: str, tmp_path: Path) -> None:
    overrides, says = HOSTILE_OVERRIDES[case]
    _assert_one_line(_run_in(tmp_path / "out", [command, "tabular", *overrides], tmp_path), says)
