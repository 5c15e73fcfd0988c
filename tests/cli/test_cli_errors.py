"""Every user mistake exits 2 with one line on stderr naming the problem, and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import REPO, run_inprocess, run_subprocess

TABULAR = REPO / "recipes" / "tabular.yaml"


def _one_line_error(argv: list[str], cwd: Path) -> str:
    res = run_inprocess(argv, cwd)
    assert res.code == 2, (res.code, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("statplug: error: ")
    assert "Traceback" not in res.err
    return lines[0]


def test_misspelled_trainer_key_suggests_the_closest(tmp_path: Path) -> None:
    line = _one_line_error(
        ["fit", str(TABULAR), "trainer.max_epoch=1"], tmp_path
    )
    assert "`trainer.max_epoch`" in line and "did you mean `trainer.max_epochs`?" in line


@pytest.mark.parametrize(
    ("override", "wrong", "suggestion"),
    [
        ("model.hiden=8", "model.hiden", "model.hidden"),
        ("data.batch_sise=8", "data.batch_sise", "data.batch_size"),
        ("callbacks.sync.every_n_train_step=2", "callbacks.sync.every_n_train_step",
         "callbacks.sync.every_n_train_steps"),
        ("sed=1", "sed", "seed"),
    ],
)
def test_misspelled_keys_everywhere(
    tmp_path: Path, override: str, wrong: str, suggestion: str
) -> None:
    line = _one_line_error(["fit", "tabular", override], tmp_path)
    assert f"`{wrong}`" in line and f"`{suggestion}`" in line


def test_unknown_fragment_suggests_the_closest(tmp_path: Path) -> None:
    line = _one_line_error(["fit", "tabular", "trainer=ddp-cpu2"], tmp_path)
    assert "`ddp-cpu-2`" in line


def test_missing_recipe_file(tmp_path: Path) -> None:
    line = _one_line_error(["fit", str(tmp_path / "absent.yaml")], tmp_path)
    assert "not found" in line and "absent.yaml" in line
    line = _one_line_error(["fit", "tinylmm"], tmp_path)
    assert "`tinylm`" in line


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  _target_: statplug.recipes.TabularMLP\n  hidden: [8,\ndata: 1\n")
    line = _one_line_error(["fit", str(bad)], tmp_path)
    # The parser fails at the end of the file; the message also names where the list opened.
    assert "broken.yaml" in line and "line 5" in line and "flow sequence at line 3" in line
    bad.write_text("model:\n  _target_: x\n  a: [1, 2\nb: 3\n")
    line = _one_line_error(["fit", str(bad)], tmp_path)
    assert "broken.yaml, line 4" in line
    bad.write_text("model:\n\t_target_: x\n")  # a tab in indentation
    line = _one_line_error(["fit", str(bad)], tmp_path)
    assert "broken.yaml" in line and "line 2" in line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_epochs=abc", "expected int"),
        ("trainer.max_epochs=2.5", "expected int"),
        ("trainer.enable_progress_bar=maybe", "expected bool"),
        ("model.lr=fast", "expected float"),
        ("data.dataset=mnist", "one of"),
        ("seed=[1]", "expected int or null"),
    ],
)
def test_bad_value_types(tmp_path: Path, override: str, expected: str) -> None:
    line = _one_line_error(["fit", "tabular", override], tmp_path)
    assert f"`{override.split('=')[0]}`" in line and expected in line


def test_bad_value_rejected_by_a_constructor(tmp_path: Path) -> None:
    # A range the parameter declares is checked before building (tests/cli/test_cli_validation.py);
    # what only the constructor knows comes back from it as one line too.
    line = _one_line_error(["fit", "tinylm", "model.dim=30", "model.heads=4"], tmp_path)
    assert "`dim`" in line and "divisible" in line
    line = _one_line_error(["fit", "tabular", "trainer.strategy=nonsense"], tmp_path)
    assert "strategy" in line


def test_audit_reports_config_errors_too(tmp_path: Path) -> None:
    line = _one_line_error(["audit", "tabular", "model.hiden=3"], tmp_path)
    assert "`model.hidden`" in line


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    """The acceptance case, as a user runs it: exit 2, one line, the closest key."""
    res = run_subprocess(
        ["fit", str(TABULAR), "trainer.max_epoch=1"], tmp_path
    )
    assert res.code == 2
    assert res.out == ""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "trainer.max_epochs" in lines[0], res.err


@pytest.mark.parametrize(
    "content", [b"hello world\n", b"", b"PK\x03\x04garbage", b"\x80\x02]q\x00."]
)
@pytest.mark.parametrize("command", ["inspect", "plot"])
def test_inspect_and_plot_of_a_non_checkpoint_file(tmp_path: Path, content: bytes, command: str):
    path = tmp_path / "not_a.ckpt"
    path.write_bytes(content)
    argv = [command, str(path)] + (["-o", str(tmp_path / "x.png")] if command == "plot" else [])
    line = _one_line_error(argv, tmp_path)
    assert "not_a.ckpt" in line
