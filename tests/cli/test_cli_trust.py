"""Trust follows authorship, and no value from the environment is stored (the real command).

What the user types and the YAML files the user names build whatever they name; a config read
back from a checkpoint builds only statplug's classes and an allowlist (Lightning's Trainer,
callbacks and loggers, torchmetrics metrics) unless --trust, and resolves only references to its
own keys. The config a checkpoint stores keeps its interpolations as text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import Result, run_subprocess

# Two short epochs: an every-epoch checkpoint callback writes two files.
TWO_EPOCHS = [
    "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"
]
EVERY_EPOCH = {
    "node": ["callbacks.every_epoch={_target_: lightning.pytorch.callbacks.ModelCheckpoint, "
             "save_top_k: -1, filename: 'every-{epoch}'}"],
    "dotted": ["callbacks.every_epoch._target_=lightning.pytorch.callbacks.ModelCheckpoint",
               "callbacks.every_epoch.save_top_k=-1",
               "callbacks.every_epoch.filename=every-{epoch}"],
}
SECRET = "s3cr3t-from-the-environment"


def _load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _one_line(res: Result) -> str:
    assert res.code == 2, (res.code, res.out[-2000:], res.err[-2000:])
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("statplug: error: "), res.err[-3000:]
    return lines[0]


@pytest.mark.parametrize("form", sorted(EVERY_EPOCH))
def test_a_callback_typed_on_the_command_line_is_built(form: str, tmp_path: Path) -> None:
    res = run_subprocess(["fit", "tabular", *TWO_EPOCHS, *EVERY_EPOCH[form]], tmp_path)
    assert res.code == 0, res.err[-3000:]
    folder = Path(res.last_line).parent
    assert sorted(p.name for p in folder.glob("every-*.ckpt")) == [
        "every-epoch=0.ckpt", "every-epoch=1.ckpt"
    ]
    stored = _load(res.last_line)["statplug"]["config"]["callbacks"]["every_epoch"]
    assert stored["_target_"] == "lightning.pytorch.callbacks.ModelCheckpoint"
    # Read back from the checkpoint, Lightning's own callbacks are on the allowlist.
    (tmp_path / "again").mkdir()
    again = run_subprocess(["fit", res.last_line, "trainer.max_epochs=1"], tmp_path / "again")
    assert again.code == 0, again.err[-3000:]


MARKER_MODULE = '''
from pathlib import Path
from lightning.pytorch.callbacks import Callback

class Marker(Callback):
    """A user's own callback: it leaves a file behind when it runs."""
    def on_fit_start(self, trainer, pl_module):
        Path("marker.txt").write_text("ran")
'''

RECIPE = """\
defaults:
  - trainer: cpu
  - callbacks: stats
seed: 0
model:
  _target_: statplug.recipes.TabularMLP
  n_features: 30
data:
  _target_: statplug.recipes.SklearnDataModule
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
callbacks:
  marker:
    _target_: usercode.Marker
"""


def test_a_users_yaml_builds_its_own_class_and_its_checkpoint_needs_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "usercode.py").write_text(MARKER_MODULE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]))
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    res = run_subprocess(["fit", str(recipe)], run_dir)
    assert res.code == 0, res.err[-3000:]
    marker = run_dir / "marker.txt"
    assert marker.read_text() == "ran"
    marker.unlink()

    line = _one_line(run_subprocess(["fit", res.last_line], run_dir))
    assert "`callbacks.marker._target_`" in line and "`usercode.Marker`" in line  # the target
    assert f"the config stored in checkpoint `{res.last_line}`" in line  # where it came from
    assert "lightning.pytorch.callbacks.*" in line and "--trust" in line  # the allowlist, the fix
    assert not marker.exists()

    trusted = run_subprocess(["fit", res.last_line, "--trust"], run_dir)
    assert trusted.code == 0, trusted.err[-3000:]
    assert marker.read_text() == "ran"


def test_no_environment_value_reaches_the_checkpoint_or_inspect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    token = "${oc.env:SECRET_TOKEN}"
    res = run_subprocess(["fit", "tabular", *TWO_EPOCHS[1:], "trainer.max_epochs=1",
                          f"description={token}"], tmp_path)
    assert res.code == 0, res.err[-3000:]
    ckpt = Path(res.last_line)
    assert SECRET.encode() not in ckpt.read_bytes()
    assert _load(ckpt)["statplug"]["config"]["description"] == token  # text, unresolved

    for argv in (["--config"], ["--json", "--config"]):
        shown = run_subprocess(["inspect", str(ckpt), *argv], tmp_path)
        assert shown.code == 0, shown.err[-3000:]
        assert SECRET not in shown.out and token in shown.out
    config = json.loads(run_subprocess(["inspect", str(ckpt), "--json", "--config"],
                                       tmp_path).out)["config"]
    assert config["trainer"]["logger"]["save_dir"] == "${..default_root_dir}"

    # Run again from the checkpoint, the environment is read only when the user trusts it.
    line = _one_line(run_subprocess(["fit", str(ckpt)], tmp_path))
    assert "`description`" in line and "oc.env" in line and "--trust" in line
