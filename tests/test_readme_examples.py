"""Every ```python block of the README runs on its own, in a fresh interpreter.

A reader copies one block, not the whole page: each block must bring its own imports and data.
A block whose first line names its command (``# example.py -- run: torchrun --nproc_per_node=2
example.py``) is saved under that name and run with that command (``torchrun`` as
``python -m torch.distributed.run``, ``python`` as this interpreter).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_RUN = re.compile(r"^#\s*(?P<file>[\w.-]+\.py)\s+--\s+run:\s*(?P<command>.+)$")


@dataclass(frozen=True)
class Block:
    section: str  # the heading above the block
    number: int  # 1-based, within the section
    code: str

    @property
    def id(self) -> str:
        return f"{self.section} #{self.number}"


def python_blocks(text: str) -> list[Block]:
    """The README's ```python blocks, each with the heading above it (a ``#`` line inside any
    fenced block is code, not a heading)."""
    blocks: list[Block] = []
    section, counts = "(top)", {}
    for match in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```|^#{1,6} ([^\n]+)$", text, re.S | re.M):
        if match.group(3) is not None:
            section = match.group(3).strip()
        elif match.group(1) == "python":
            counts[section] = counts.get(section, 0) + 1
            blocks.append(Block(section, counts[section], match.group(2)))
    return blocks


def _command(block: Block, folder: Path) -> list[str]:
    """Save the block in ``folder``; the command that runs it."""
    first = block.code.splitlines()[0] if block.code.strip() else ""
    named = _RUN.match(first)
    if named is None:
        (folder / "block.py").write_text(block.code)
        return [sys.executable, "block.py"]
    (folder / named["file"]).write_text(block.code)
    argv = shlex.split(named["command"])
    head = {"torchrun": [sys.executable, "-m", "torch.distributed.run"],
            "python": [sys.executable]}.get(argv[0], [argv[0]])
    return [*head, *argv[1:]]


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5  # a runner that finds nothing must fail, not pass


# torch's gloo teardown aborts a multi-process run now and then as it exits, with no user code
# involved (tests/dist_utils.py): only that signature is retried, once.
_TEARDOWN_ABORT = ("terminate called without an active exception", "exitcode: -6")


def _run(block: Block, folder: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        _command(block, folder), cwd=folder, env=env, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_on_its_own(block: Block, tmp_path: Path) -> None:
    proc = _run(block, tmp_path)
    if proc.returncode != 0 and any(s in proc.stderr for s in _TEARDOWN_ABORT):
        proc = _run(block, tmp_path)
    assert proc.returncode == 0, f"README.md, {block.id}:\n{proc.stderr[-3000:]}"
