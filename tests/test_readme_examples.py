"""The README's examples run: each listed section's ```python blocks, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# Sections whose code is complete and runs on CPU in seconds.
SECTIONS = ["Quantiles", "torch.compile", "Weight averaging (EMA/SWA)"]


def python_blocks(section: str) -> list[str]:
    """The ```python blocks under the ``## section`` heading of the README."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no section '## {section}'"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), re.S | re.M)


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs(section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(section)
    assert blocks, f"README.md section '{section}' has no python block"
    monkeypatch.chdir(tmp_path)  # whatever the example writes (checkpoints) goes here
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md ({section}, block {i + 1})", "exec"), namespace)
