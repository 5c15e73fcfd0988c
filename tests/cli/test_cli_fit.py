"""`statplug fit`, `inspect`, `plot`, `recipes` and `audit` on the bundled recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch
from cli_helpers import SHORT, Result, run_ddp_subprocess, run_inprocess
from omegaconf import OmegaConf

RECIPES = ("tabular", "digits", "tinylm", "pruning")
# Samples per training batch in each recipe (a stat's count is a multiple of it).
BATCH = {"tabular": 32, "digits": 64, "tinylm": 64, "pruning": 16}
# tinylm pads its sequences (15 positions, at least 7 of them real: min_len 8) and its stats
# count real positions only (ActivationStats' mask_fn, the model's own mask).
TOKENS = {"tinylm": (7, 15)}


def _counts_ok(count: int, name: str, batches: int) -> bool:
    """Whether ``count`` is what ``batches`` batches of recipe ``name`` give a stat."""
    low, high = TOKENS.get(name, (1, 1))
    return batches * BATCH[name] * low <= count <= batches * BATCH[name] * high


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Result, Path]]:
    """Each recipe fitted for 3 steps, in-process, in its own working directory."""
    out = {}
    for name in RECIPES:
        cwd = tmp_path_factory.mktemp(name)
        res = run_inprocess(["fit", name, *SHORT], cwd)
        assert res.code == 0, res.err[-3000:]
        out[name] = (res, cwd)
    return out


def _load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- fit
@pytest.mark.parametrize("name", RECIPES)
def test_fit_prints_checkpoint_path_last(fitted: dict[str, tuple[Result, Path]], name: str) -> None:
    res, cwd = fitted[name]
    ckpt = Path(res.last_line)
    assert ckpt.is_absolute() and ckpt.suffix == ".ckpt" and ckpt.is_file()
    # Under the working directory, as Lightning's default `lightning_logs/`.
    assert ckpt.is_relative_to(cwd.resolve() / "lightning_logs")
    assert "metrics:" in res.out and "val_acc=" in res.out


@pytest.mark.parametrize("name", RECIPES)
def test_checkpoint_loads_weights_only_with_config(
    fitted: dict[str, tuple[Result, Path]], name: str
) -> None:
    ckpt = _load(fitted[name][0].last_line)
    meta = ckpt["statplug"]
    assert meta["version"] == 1
    cfg = meta["config"]
    assert cfg["model"]["_target_"].startswith("statplug.recipes.")
    assert cfg["trainer"]["limit_train_batches"] == 3  # the resolved config, overrides included
    counts = {s["name"]: s["count"] for s in meta["stats"]}
    assert counts and all(_counts_ok(c, name, 3) for c in counts.values())
    if name == "tinylm":  # padded: fewer than every position, the same real ones everywhere
        layers = [v for k, v in ckpt["callbacks"].items() if k.startswith("ActivationStats")]
        every = {int(e["moments"]["count"]) for e in layers[0]["layers"]} | set(counts.values())
        assert len(every) == 1 and every.pop() < 3 * BATCH[name] * 15


def test_recipe_specific_state(fitted: dict[str, tuple[Result, Path]]) -> None:
    digits = _load(fitted["digits"][0].last_line)
    states = [v for k, v in digits["callbacks"].items() if k.startswith("ActivationStats")]
    assert states and {layer["name"] for layer in states[0]["layers"]} == {
        "features.conv1", "features.conv2", "classifier.fc1", "classifier.fc2"
    }
    pruning = _load(fitted["pruning"][0].last_line)
    masks = {k: v for k, v in pruning["state_dict"].items() if k.endswith("_mask")}
    assert masks and all(v.dtype == torch.bool for v in masks.values())
    assert all(abs(v.float().mean().item() - 0.5) < 0.02 for v in masks.values())
    tinylm = _load(fitted["tinylm"][0].last_line)
    kinds = {e["kind"] for e in tinylm["statplug"]["masks"] + tinylm["statplug"]["encodings"]}
    assert kinds == {"CausalMask", "RotaryEncoding"}


# ----------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("name", RECIPES)
def test_inspect_lists_every_stat_with_its_count(
    fitted: dict[str, tuple[Result, Path]], name: str, tmp_path: Path
) -> None:
    path = fitted[name][0].last_line
    res = run_inprocess(["inspect", path], tmp_path)
    assert res.code == 0, res.err
    rows = {line.split()[0]: line for line in res.out.splitlines() if line.strip()}
    ckpt = _load(path)
    for stat in ckpt["statplug"]["stats"]:
        assert stat["name"] in rows, res.out
        assert f"{stat['count']:,}" in rows[stat["name"]].split()
    for entry in ckpt["statplug"]["masks"] + ckpt["statplug"]["encodings"]:
        assert entry["name"] in rows
    for state in ckpt.get("callbacks", {}).values():
        for layer in state.get("layers", []):
            assert f"ActivationStats:{layer['name']}.moments" in rows


@pytest.mark.parametrize("name", RECIPES)
def test_inspect_json_is_valid(
    fitted: dict[str, tuple[Result, Path]], name: str, tmp_path: Path
) -> None:
    path = fitted[name][0].last_line
    res = run_inprocess(["inspect", path, "--json"], tmp_path)
    assert res.code == 0, res.err
    data = json.loads(res.out)
    stats = {e["name"]: e for e in data["entries"] if e["group"] == "stat"}
    for stat in _load(path)["statplug"]["stats"]:
        assert stats[stat["name"]]["count"] == stat["count"]
        assert stats[stat["name"]]["kind"] == stat["kind"]
    assert data["has_config"] is True


def test_inspect_reads_layout_without_statplug_metadata(
    fitted: dict[str, tuple[Result, Path]], tmp_path: Path
) -> None:
    for name in ("tabular", "digits", "pruning"):
        ckpt = _load(fitted[name][0].last_line)
        expected = {s["name"]: (s["kind"], s["count"]) for s in ckpt["statplug"]["stats"]}
        del ckpt["statplug"]
        bare = tmp_path / f"{name}.ckpt"
        torch.save(ckpt, bare)
        data = json.loads(run_inprocess(["inspect", str(bare), "--json"], tmp_path).out)
        found = {e["name"]: (e["kind"], e["count"]) for e in data["entries"]}
        assert expected.items() <= found.items()
        if name == "digits":
            assert any(n.startswith("ActivationStats:features.conv1") for n in found)
        if name == "pruning":
            assert any(e["kind"] == "pruning mask" for e in data["entries"])
    # A bare state_dict (torch.save(model.state_dict())) works too.
    bare_sd = tmp_path / "sd.pt"
    torch.save(_load(fitted["tabular"][0].last_line)["state_dict"], bare_sd)
    res = run_inprocess(["inspect", str(bare_sd)], tmp_path)
    assert res.code == 0 and "norm.moments" in res.out and "RunningMoments" in res.out


def test_inspect_errors(tmp_path: Path) -> None:
    res = run_inprocess(["inspect", str(tmp_path / "missing.ckpt")], tmp_path)
    assert res.code == 2 and "not found" in res.err and len(res.err.strip().splitlines()) == 1
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    res = run_inprocess(["inspect", str(junk)], tmp_path)
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- plot
@pytest.mark.parametrize("name", ["tabular", "digits"])
def test_plot_writes_a_png(
    fitted: dict[str, tuple[Result, Path]], name: str, tmp_path: Path
) -> None:
    out = tmp_path / "plots" / f"{name}.png"
    res = run_inprocess(["plot", fitted[name][0].last_line, "-o", str(out)], tmp_path)
    assert res.code == 0, res.err
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# ----------------------------------------------------------------------------- re-run
def test_stored_config_reruns_the_recipe(
    fitted: dict[str, tuple[Result, Path]], tmp_path: Path
) -> None:
    path = fitted["tinylm"][0].last_line
    cfg = _load(path)["statplug"]["config"]
    recipe = tmp_path / "stored.yaml"
    OmegaConf.save(OmegaConf.create(cfg), recipe)
    res = run_inprocess(["fit", str(recipe), "trainer.limit_train_batches=2"], tmp_path)
    assert res.code == 0, res.err[-3000:]
    again = _load(res.last_line)["statplug"]
    assert again["config"]["model"] == cfg["model"]
    assert _counts_ok(again["stats"][0]["count"], "tinylm", 2)
    # The checkpoint itself can be given as the recipe.
    res = run_inprocess(["fit", path, "trainer.limit_train_batches=1"], tmp_path)
    assert res.code == 0, res.err[-3000:]
    assert _load(res.last_line)["statplug"]["config"]["data"] == cfg["data"]


# ----------------------------------------------------------------------------- recipes, audit
def test_recipes_lists_bundled_recipes_with_descriptions(tmp_path: Path) -> None:
    res = run_inprocess(["recipes"], tmp_path)
    assert res.code == 0
    lines = res.out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(RECIPES)
    assert all(len(line.split()) > 3 for line in lines)


def test_audit_clean_recipe_exits_0(tmp_path: Path) -> None:
    res = run_inprocess(["audit", "tabular"], tmp_path)
    assert res.code == 0, res.err
    assert "TabularMLP" in res.out


def test_audit_with_errors_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  _target_: audit_models.BufferInOptimizer\n  n_features: 3\n")
    # The user's own YAML builds the user's own class: no --trust needed.
    res = run_inprocess(["audit", str(recipe)], tmp_path)
    assert res.code == 1, res.out + res.err
    assert "buffer-in-optimizer" in res.out


# ----------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_tabular_reaches_95_percent_validation_accuracy(tmp_path: Path) -> None:
    res = run_inprocess(["fit", "tabular"], tmp_path)
    assert res.code == 0, res.err[-3000:]
    match = re.search(r"\bval_acc=([0-9.]+)", res.out)
    assert match, res.out
    assert float(match.group(1)) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_on_two_process_ddp(name: str, tmp_path: Path) -> None:
    """`trainer=ddp-cpu-2` from the console script: Lightning re-launches it for rank 1."""
    res = run_ddp_subprocess(["fit", name, "trainer=ddp-cpu-2", *SHORT], tmp_path)
    assert res.code == 0, res.err[-3000:]
    assert "Traceback" not in res.err
    # Rank zero alone prints: one result block, the checkpoint path last.
    assert res.out.count("metrics:") == 1
    ckpt = _load(res.last_line)
    assert ckpt["statplug"]["config"]["trainer"]["strategy"] == "ddp"
    # SyncStats merged both ranks: each stat counts 3 batches on each of the 2 ranks.
    for stat in ckpt["statplug"]["stats"]:
        assert _counts_ok(stat["count"], name, 2 * 3), stat
    for state in ckpt.get("callbacks", {}).values():
        for layer in state.get("layers", []):
            count = int(layer["moments"]["count"])
            if name == "tinylm":
                assert _counts_ok(count, name, 2 * 3)
            else:
                assert count % (2 * 3 * BATCH[name]) == 0


def test_inspect_refuses_pickles_unless_trusted(
    fitted: dict[str, tuple[Result, Path]], tmp_path: Path
) -> None:
    ckpt = _load(fitted["tabular"][0].last_line)
    ckpt["hyper_parameters"] = OmegaConf.create({"a": 1})  # a pickled object
    path = tmp_path / "pickled.ckpt"
    torch.save(ckpt, path)
    res = run_inprocess(["inspect", str(path)], tmp_path)
    assert res.code == 2 and "--trust" in res.err and len(res.err.strip().splitlines()) == 1
    res = run_inprocess(["inspect", str(path), "--trust"], tmp_path)
    assert res.code == 0 and "norm.moments" in res.out


def test_tinylm_with_sinusoidal_positions(tmp_path: Path) -> None:
    res = run_inprocess(["fit", "tinylm", "model.positions=sinusoidal", *SHORT], tmp_path)
    assert res.code == 0, res.err[-3000:]
    out = run_inprocess(["inspect", res.last_line], tmp_path).out
    assert "SinusoidalEncoding" in out and "RotaryEncoding" not in out


def test_fit_without_checkpoint_callback_or_logger_still_saves(tmp_path: Path) -> None:
    res = run_inprocess(
        ["fit", "tabular", *SHORT, "trainer.enable_checkpointing=false", "trainer.logger=false"],
        tmp_path,
    )
    assert res.code == 0, res.err[-3000:]
    assert Path(res.last_line) == (tmp_path / "checkpoints" / "final.ckpt").resolve()
    assert _load(res.last_line)["statplug"]["stats"][0]["count"] == 3 * BATCH["tabular"]
