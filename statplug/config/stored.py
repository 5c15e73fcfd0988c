"""Read back the recipe config a checkpoint stores, to run it again (``statplug fit run.ckpt``).

``statplug fit`` stores the composed config with its interpolations unresolved
(``${oc.env:TOKEN}`` stays text), so no value from the environment lands in a checkpoint. A
checkpoint is a file someone else may have written, so without ``--trust`` its config

* resolves only references to other keys of itself (``${data.vocab_size}``, ``${..root}``),
  each naming a plain value, inlined here; a resolver (``oc.env`` reads the environment into
  values a logger may upload, ``oc.create`` builds nodes) is refused, and
* builds only the allowlist of :mod:`statplug.config.targets`.

With ``--trust`` the stored config is composed as written, interpolations live, like a YAML file
of the user's own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from statplug.config.errors import OMEGACONF_ERRORS, ConfigError, first_line
from statplug.config.targets import check_targets, upgrade_targets

__all__ = ["inline_references", "read_stored_config"]

# `${key.path}` or a relative `${..key}`, alone in its string: OmegaConf's plain node reference.
_REFERENCE = re.compile(r"\$\{(\.*)([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)\}")
_SHOWN = 80  # characters of a refused interpolation quoted in the message


def read_stored_config(path: Path, *, trust: bool = False) -> DictConfig:
    """The recipe config stored by ``statplug fit`` in ``checkpoint["statplug"]["config"]``.

    Raises:
        ConfigError: no recipe config, a value plain YAML cannot hold, or (without ``trust``) a
            resolver or a ``_target_`` outside the allowlist; one line naming the key, where it
            came from and the fix.
    """
    from statplug.inspect.checkpoint import load_checkpoint

    meta = load_checkpoint(path, trust=trust).get("statplug")
    cfg = meta.get("config") if isinstance(meta, dict) else None
    if isinstance(meta, dict) and meta.get("config_source") == "LightningCLI":
        raise ConfigError(
            f"checkpoint `{path}` holds a LightningCLI config, not a recipe; run it again with "
            "your LightningCLI script (`statplug inspect --config` prints the stored config)"
        )
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"checkpoint `{path}` holds no recipe config (checkpoint[\"statplug\"][\"config\"]); "
            "only checkpoints written by `statplug fit` (or a model with `statplug_config`) can "
            "be re-run"
        )
    bad = _first_non_plain(cfg, "config")
    if bad is not None:
        raise ConfigError(
            f"checkpoint `{path}`: its stored config holds {bad}; a stored config holds only "
            "mappings with text keys, lists, text, numbers, booleans and null"
        )
    if not trust:
        origin = f"the config stored in checkpoint `{path}`"
        cfg = inline_references(cfg, origin)
        check_targets(upgrade_targets(cfg), origin=origin)
    try:
        return OmegaConf.create(cfg)
    except OMEGACONF_ERRORS as err:
        raise ConfigError(f"checkpoint `{path}`: bad stored config: {first_line(err)}") from None


def inline_references(cfg: dict[str, Any], origin: str) -> dict[str, Any]:
    """A copy of the plain ``cfg`` with each ``${key}`` reference replaced by the plain value
    it names; any other text holding ``${`` is refused.

    Each reference is looked up once in ``cfg`` as stored and must name a plain value with no
    ``${`` of its own, so the result is never larger than a value per key (a chain or a nest of
    references, which grows exponentially as OmegaConf resolves it, is refused).

    Raises:
        ConfigError: naming the key, the interpolation, ``origin`` and ``--trust``.
    """
    out = _inline(cfg, [], cfg, origin)
    assert isinstance(out, dict)
    return out


def _inline(node: Any, where: list[str], root: dict[str, Any], origin: str) -> Any:
    if isinstance(node, dict):
        return {k: _inline(v, [*where, str(k)], root, origin) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, [*where, str(i)], root, origin) for i, v in enumerate(node)]
    if not (isinstance(node, str) and "${" in node):
        return node
    match = _REFERENCE.fullmatch(node)
    key = ".".join(where)
    if match is None:
        _refuse(key, node, origin, "only references to other keys (`${model.hidden}`) are "
                "resolved, not resolvers such as `oc.env` (your environment) or `oc.create`")
    dots, name = match.groups()
    base = where[:-1]  # the node holding this value; each dot past the first goes up one level
    if dots:
        if len(dots) - 1 > len(base):
            _refuse(key, node, origin, "it refers above the top of the config")
        base = base[: len(base) - (len(dots) - 1)]
    else:
        base = []
    value = _lookup(root, [*base, *name.split(".")])
    if value is _NOTHING or isinstance(value, dict | list) or (
        isinstance(value, str) and "${" in value
    ):
        _refuse(key, node, origin, f"`{'.'.join([*base, name])}` is not a plain value of it")
    return value


_NOTHING = object()


def _lookup(root: Any, parts: list[str]) -> Any:
    node = root
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _NOTHING
    return node


def _refuse(key: str, text: str, origin: str, why: str) -> NoReturn:
    from statplug.inspect.checkpoint import printable

    shown = printable(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")
    raise ConfigError(
        f"`{key}`: refusing the interpolation `{shown}` in {origin}: without --trust {why}; "
        "pass --trust if you trust this file"
    )


def _first_non_plain(node: Any, where: str) -> str | None:
    """The first value (``"a tuple at `config.model`"``) that plain YAML could not have written."""
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                return f"a {type(k).__name__} key at `{where}`"
            bad = _first_non_plain(v, f"{where}.{k}")
            if bad is not None:
                return bad
        return None
    if isinstance(node, list):
        for i, v in enumerate(node):
            bad = _first_non_plain(v, f"{where}.{i}")
            if bad is not None:
                return bad
        return None
    if node is None or isinstance(node, str | int | float | bool):
        return None
    return f"a {type(node).__name__} at `{where}`"
