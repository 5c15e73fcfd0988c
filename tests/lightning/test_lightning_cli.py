"""Under LightningCLI, the config it parsed is stored in ``checkpoint["statplug"]``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cli"))
from cli_helpers import run_subprocess  # noqa: E402


@pytest.mark.slow
def test_lightning_cli_config_is_stored_plain_and_shown_by_inspect(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH",
                                                                                   "")])}
    proc = subprocess.run(
        [sys.executable, str(HERE / "scripts" / "cli_fit.py"), "fit", "--trainer.max_epochs=2",
         "--trainer.accelerator=cpu", "--trainer.logger=false",
         "--trainer.enable_progress_bar=false",
         f"--trainer.default_root_dir={tmp_path}", "--model.hidden=6", "--model.lr=0.01"],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpts = list(tmp_path.glob("**/*.ckpt"))
    assert len(ckpts) == 1, ckpts
    ckpt = torch.load(ckpts[0], weights_only=True)  # plain types only
    meta = ckpt["statplug"]
    assert meta["config_source"] == "LightningCLI"
    cfg = meta["config"]
    assert cfg["trainer"]["max_epochs"] == 2
    assert cfg["model"]["hidden"] == 6 and cfg["model"]["lr"] == 0.01
    assert cfg["trainer"]["default_root_dir"] == str(tmp_path)

    res = run_subprocess(["inspect", str(ckpts[0]), "--config"], tmp_path)
    assert res.code == 0, res.err
    assert "LightningCLI config stored" in res.out
    assert "# config stored by LightningCLI" in res.out
    assert "hidden: 6" in res.out and "max_epochs: 2" in res.out
    # It is not a recipe: `statplug fit CKPT` says so instead of failing on its keys.
    res = run_subprocess(["fit", str(ckpts[0])], tmp_path)
    assert res.code == 2 and "holds a LightningCLI config" in res.err, res.err
