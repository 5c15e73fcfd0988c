"""Hostile checkpoints, stored configs and YAML files, built small, for the `statplug` command.

Each builder writes one file into a folder and returns a :class:`Hostile` naming the file and a
fragment that the one-line refusal must contain. ``VICTIM`` is the file a hostile config tries to
write; tests check it is never created.
"""

from __future__ import annotations

import copy
import io
import os
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from statplug import RunningMoments
from statplug.config import load_recipe

VICTIM = "victim.txt"


@dataclass(frozen=True)
class Hostile:
    path: Path
    says: str  # a fragment of the expected one-line message (case-insensitive)


def _torch_zip(obj: Any) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write_zip(
    path: Path, records: dict[str, bytes], compression: int = zipfile.ZIP_STORED
) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in records.items():
            zf.writestr(name, data)


def _stat_state() -> dict[str, torch.Tensor]:
    stat = RunningMoments(3)
    stat.update(torch.randn(20, 3))
    return {f"norm.{k}": v for k, v in stat.state_dict().items()}


# ----------------------------------------------------------------------------- refused files
def text_file(d: Path) -> Hostile:
    p = d / "notes.ckpt"
    p.write_text("epoch 3: loss went down\n")
    return Hostile(p, "is a text file")


def random_bytes(d: Path) -> Hostile:
    p = d / "random.ckpt"
    p.write_bytes(random.Random(0).randbytes(4096))
    return Hostile(p, "not a torch checkpoint")


def empty_file(d: Path) -> Hostile:
    p = d / "empty.ckpt"
    p.write_bytes(b"")
    return Hostile(p, "empty")


def zip_not_torch(d: Path) -> Hostile:
    p = d / "archive.ckpt"
    _write_zip(p, {"readme.txt": b"hello"})
    return Hostile(p, "without torch's data.pkl")


def zip_bomb(d: Path) -> Hostile:
    """Deflated records: 64 MB of zeros in a 70 KB file (torch's reader inflates them)."""
    p = d / "zipbomb.ckpt"
    _write_zip(p, _torch_zip({"x": torch.zeros(1 << 26, dtype=torch.uint8)}), zipfile.ZIP_DEFLATED)
    return Hostile(p, "compressed")


def overlapping_records(d: Path) -> Hostile:
    """A central directory that claims a record far larger than the file."""
    p = d / "overlap.ckpt"
    records = _torch_zip({"state_dict": _stat_state()})
    _write_zip(p, records)
    data = bytearray(p.read_bytes())
    cd = data.rfind(b"PK\x01\x02")  # the last central directory entry
    data[cd + 24 : cd + 28] = (1 << 30).to_bytes(4, "little")  # its uncompressed size
    p.write_bytes(bytes(data))
    return Hostile(p, "claim")


def expanded_tensor(d: Path) -> Hostile:
    """A stat whose mean is a zero-stride view: 2**31 elements from a 4-byte storage."""
    p = d / "expanded.ckpt"
    state = _stat_state()
    state["norm.mean"] = torch.zeros(1).expand(1 << 31)
    state["norm.m2"] = torch.zeros(1).expand(1 << 31)
    torch.save({"state_dict": state}, p)
    return Hostile(p, "claims")


def repeated_views(d: Path) -> Hostile:
    """Thousands of full views of one 1 MB storage: gigabytes of tensors from a small file."""
    p = d / "views.ckpt"
    base = torch.zeros(1 << 18)
    state = {f"b{i}.running_mean": base[:] for i in range(4000)}
    torch.save({"state_dict": state}, p)
    return Hostile(p, "tensors claim more than")


def shared_list_bomb(d: Path) -> Hostile:
    """A pickle "billion laughs": 2**40 leaves through shared references, in a few KB."""
    p = d / "laughs.ckpt"
    node: Any = ["lol"]
    for _ in range(40):
        node = [node, node]
    torch.save({"state_dict": _stat_state(), "hyper_parameters": {"x": node}}, p)
    return Hostile(p, "repeats containers")


def cyclic_list(d: Path) -> Hostile:
    p = d / "cycle.ckpt"
    loop: list[Any] = []
    loop.append(loop)
    torch.save({"state_dict": _stat_state(), "callbacks": {"X": {"layers": loop}}}, p)
    return Hostile(p, "too deeply")


def deep_nesting(d: Path) -> Hostile:
    p = d / "deep.ckpt"
    node: Any = 1
    for _ in range(300):
        node = {"a": node}
    torch.save({"state_dict": _stat_state(), "hyper_parameters": node}, p)
    return Hostile(p, "too deeply")


class _Pickled:
    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (os.getcwd, ())  # harmless if ever run; weights_only refuses the global


def pickled_object(d: Path) -> Hostile:
    p = d / "pickled.ckpt"
    torch.save({"state_dict": _stat_state(), "hyper_parameters": _Pickled()}, p)
    return Hostile(p, "--trust")


def not_a_dict(d: Path) -> Hostile:
    p = d / "list.ckpt"
    torch.save([torch.zeros(2)], p)
    return Hostile(p, "not a checkpoint dict")


def a_directory(d: Path) -> Hostile:
    p = d / "folder.ckpt"
    p.mkdir()
    return Hostile(p, "folder.ckpt")


REFUSED_CHECKPOINTS: dict[str, Callable[[Path], Hostile]] = {
    f.__name__: f
    for f in (
        text_file, random_bytes, empty_file, zip_not_torch, zip_bomb, overlapping_records,
        expanded_tensor, repeated_views, shared_list_bomb, cyclic_list, deep_nesting,
        pickled_object, not_a_dict, a_directory,
    )
}


# ----------------------------------------------------------------------------- malformed stats
def malformed_checkpoint(d: Path, kind: str) -> Path:
    """A checkpoint that loads but whose stats or metadata are not what statplug writes."""
    state = _stat_state()
    meta: dict[str, Any] = {"version": 1, "stats": [], "masks": [], "encodings": []}
    if kind == "count_vector":
        state["norm.count"] = torch.tensor([3, 4, 5])
    elif kind == "empty_mean":
        state["norm.mean"] = torch.zeros(0)
        state["norm.m2"] = torch.zeros(0)
    elif kind == "negative_count":
        state["norm.count"] = torch.tensor(-5)
    elif kind == "shape_mismatch":
        state["norm.m2"] = torch.zeros(7)
    elif kind == "non_finite":
        state["norm.mean"] = torch.tensor([float("nan"), float("inf"), 3e38])
        state["norm.m2"] = torch.tensor([float("-inf"), 1e308, -1.0], dtype=torch.float64).float()
    elif kind == "complex_and_extreme":
        state["b.running_mean"] = torch.tensor([1 + 2j, 3j])
        state["b.num_batches_tracked"] = torch.tensor(2**63 - 1)
        state["b.flags"] = torch.zeros(0, dtype=torch.bool)
    elif kind == "escape_keys":
        state["\x1b[2J\x1b[31mevil\nname.count"] = torch.tensor(3)
        state["\x1b[2J\x1b[31mevil\nname.mean"] = torch.zeros(2)
        state["\x1b[2J\x1b[31mevil\nname.m2"] = torch.zeros(2)
    elif kind == "metadata_types":
        meta = {"version": "x", "stats": 5, "masks": [{"name": "m", "kind": 3, "shape": "abc"}],
                "encodings": [7, {"name": None, "shape": [1.5]}], "config": [1]}
    elif kind == "frozen_vector":
        state["norm.frozen_flag"] = torch.ones(4, dtype=torch.bool)
        state["norm.n_skipped"] = torch.tensor([1.5])
    elif kind == "odd_config":
        meta["config"] = {
            "model": {"x": torch.zeros(2)}, "lr": float("nan"), 3: "\x1b[2Jk",
            "\x1b]0;title\x07": torch.ones(1),
        }
    elif kind == "non_str_keys":
        return _save(d / f"{kind}.ckpt", {"state_dict": {1: torch.zeros(2), (2, 3): torch.ones(1)}})
    else:
        raise ValueError(kind)
    return _save(d / f"{kind}.ckpt", {"state_dict": state, "statplug": meta, "epoch": "three"})


MALFORMED_KINDS = (
    "count_vector", "empty_mean", "negative_count", "shape_mismatch", "non_finite",
    "complex_and_extreme", "escape_keys", "metadata_types", "frozen_vector", "odd_config",
    "non_str_keys",
)


def _save(p: Path, obj: Any) -> Path:
    torch.save(obj, p)
    return p


# ----------------------------------------------------------------------------- stored configs
def _tabular_config() -> dict[str, Any]:
    return copy.deepcopy(load_recipe("tabular").config)


def stored_config_checkpoint(d: Path, kind: str) -> Hostile:
    """A checkpoint that loads with weights_only=True but whose stored config runs code."""
    cfg = _tabular_config()
    victim = str(d / VICTIM)
    says = {
        "open": "builtins.open",
        "attribute_path": "statplug.inspect.checkpoint.torch.save",
        "prefix": "statplugx.evil.Model",
        "nested_logger": "builtins.open",
        "args_list": "shutil.copyfile",
        "partial": "numpy.savetxt",
        "deep_callback": "torch.save",
        "private": "statplug.config.loader._YamlLoader",
        "not_a_string": "123",
        "interpolation": "trainer.default_root_dir",
    }[kind]
    if kind == "open":
        cfg["model"] = {"_target_": "builtins.open", "file": victim, "mode": "w"}
    elif kind == "attribute_path":
        cfg["model"] = {"_target_": says, "obj": 1, "f": victim}
    elif kind == "prefix":
        cfg["model"]["_target_"] = says
    elif kind == "nested_logger":
        cfg["trainer"]["logger"] = {"_target_": "builtins.open", "file": victim, "mode": "w"}
    elif kind == "args_list":
        cfg["model"]["_args_"] = [{"_target_": "shutil.copyfile", "src": __file__, "dst": victim}]
    elif kind == "partial":
        cfg["callbacks"]["sync"]["every_n_train_steps"] = {
            "_target_": "numpy.savetxt", "_partial_": True, "fname": victim,
        }
    elif kind == "deep_callback":
        cfg["callbacks"]["audit"]["x"] = [{"y": {"_target_": "torch.save", "obj": 1, "f": victim}}]
    elif kind == "private":
        cfg["model"]["_target_"] = says
    elif kind == "not_a_string":
        cfg["model"]["_target_"] = 123
    elif kind == "interpolation":
        # Stored resolved, so literal text; re-resolved, it would build builtins.open.
        cfg["trainer"]["default_root_dir"] = (
            f"${{oc.create:{{_target_: builtins.open, file: {victim}, mode: w}}}}"
        )
    else:
        raise ValueError(kind)
    p = d / f"config_{kind}.ckpt"
    torch.save({"state_dict": _stat_state(), "statplug": {"version": 1, "config": cfg}}, p)
    return Hostile(p, says)


STORED_CONFIG_KINDS = (
    "open", "attribute_path", "prefix", "nested_logger", "args_list", "partial",
    "deep_callback", "private", "not_a_string", "interpolation",
)


# ----------------------------------------------------------------------------- YAML
_RECIPE_HEAD = "defaults:\n  - trainer: cpu\n  - callbacks: stats\n"
_MODEL = (
    "model:\n  _target_: statplug.recipes.TabularMLP\n  n_features: 30\n"
    "data:\n  _target_: statplug.recipes.SklearnDataModule\n"
)


def yaml_file(d: Path, kind: str) -> Hostile:
    """A hostile recipe file; ``statplug fit``/``audit`` must refuse it in one line."""
    p = d / f"{kind}.yaml"
    victim = d / VICTIM
    says = kind
    if kind == "recursive_alias":
        text, says = _MODEL + "trainer: &a [*a]\n", "aliases"
    elif kind == "billion_laughs":
        lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
        text, says = "\n".join(lines) + "\n", "aliases"
    elif kind == "merge_key":
        text = _MODEL + "base: &b {max_epochs: 1}\ntrainer:\n  <<: *b\n"
        says = "aliases"
    elif kind == "deep_nesting":
        text, says = "model: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"
    elif kind == "huge":
        text, says = "description: '" + "x" * (2 << 20) + "'\n", "at most"
    elif kind == "python_tag":
        text = f"model: !!python/object/apply:os.system ['touch {victim}']\n"
        says = "bad yaml"
    elif kind == "group_path_in_defaults":
        text = "defaults:\n  - callbacks: ../../../../../../tmp/x\n" + _MODEL
        says = "not a path"
    elif kind == "group_key_path":
        text = "defaults:\n  - ../configs/callbacks: stats\n" + _MODEL
        says = "not a path"
    elif kind == "interpolation_cycle":
        text = _MODEL.replace("n_features: 30", "n_features: ${model.n_features}")
        says = "resolve"
    elif kind == "interpolation_bomb":
        text = _MODEL + "description: '${oc.create:" + "[" * 3000 + "]" * 3000 + "}'\n"
        says = "nests too deeply"
    elif kind == "not_utf8":
        p.write_bytes(b"model: \xff\xfe\x00bad\n")
        return Hostile(p, "utf-8")
    elif kind == "top_level_list":
        text, says = "- model\n- data\n", "mapping"
    elif kind == "misspelled_null_callback":
        text, says = _RECIPE_HEAD + _MODEL + "callbacks:\n  audt: null\n", "callbacks.audit"
    else:
        raise ValueError(kind)
    p.write_text(text)
    return Hostile(p, says)


# A `_target_` in a YAML file the user names is the user's own intent and is built (trust follows
# authorship; tests/cli/test_cli_trust.py): only a checkpoint's stored config is refused one.
YAML_KINDS = (
    "recursive_alias", "billion_laughs", "merge_key", "deep_nesting", "huge", "python_tag",
    "group_path_in_defaults", "group_key_path",
    "interpolation_cycle", "interpolation_bomb", "not_utf8", "top_level_list",
    "misspelled_null_callback",
)

# Overrides on a bundled recipe that must be refused: malformed or misspelled (an override's
# `_target_` is the user's own and is built).
HOSTILE_OVERRIDES: dict[str, tuple[list[str], str]] = {
    "group_path": (["callbacks=../../../../../../tmp/x"], "not a path"),
    "misspelled_null": (["callbacks.audt=null"], "callbacks.audit"),
    "misspelled_value": (["callbacks.syn=3"], "callbacks.sync"),
    "misspelled_nested": (["callbacks.syn.every_n_train_steps=2"], "callbacks.sync"),
}
