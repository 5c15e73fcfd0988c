"""Find, read and compose recipes: YAML fragments from ``configs/``, the recipe, then overrides.

A recipe is one YAML file. Its ``defaults`` entry names fragments by group, e.g.::

    defaults:
      - trainer: cpu          # configs/trainer/cpu.yaml, merged under the key `trainer`
      - callbacks: stats      # configs/callbacks/stats.yaml, merged under `callbacks`

(a mapping ``{trainer: cpu, callbacks: stats}`` works too). Composition, later wins:
fragments in order, then the recipe's own keys, then the command-line overrides. An override
``group=name`` (``trainer=ddp-cpu-2``) selects another fragment for a group; ``a.b=value`` sets
a key (values are parsed as YAML: ``3``, ``1e-3``, ``null``, ``[1, 2]``).

Fragments are looked up in a ``configs/`` folder beside the recipe or beside its folder (so a
project can keep its own), then in the configs shipped with statplug. The bundled recipes are the
repository's top-level ``recipes/`` (beside the models and data modules they build) and
``configs/`` folders, installed as the packages :mod:`statplug.recipes` and ``statplug.configs``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from statplug.config.errors import OMEGACONF_ERRORS, ConfigError, closest, first_line
from statplug.config.stored import read_stored_config
from statplug.config.targets import upgrade_targets
from statplug.inspect.checkpoint import CHECKPOINT_SUFFIXES

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "Recipe",
    "bundled_configs_dir",
    "bundled_recipes",
    "bundled_recipes_dir",
    "compose",
    "find_recipe",
    "load_yaml",
    "parse_overrides",
    "parse_yaml",
    "to_plain",
    "unresolved",
]


# Limits on config text, so a small hostile file cannot make the loader run long or grow large.
MAX_YAML_BYTES = 1 << 20  # the bundled recipes are under 1 KiB
MAX_YAML_DEPTH = 32  # PyYAML composes nodes recursively: deeper input ends in RecursionError
# Group and fragment names select the file configs/GROUP/NAME.yaml: names, never paths.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


class _YamlLoader(yaml.SafeLoader):
    """A safe loader for configs.

    YAML 1.2 floats: ``1e-3`` is a number (PyYAML's YAML 1.1 rules read it as text). Aliases
    (``*name``) are refused: the recipes need none, and each alias is another reference to the
    same node, which OmegaConf copies out, so nested aliases grow a 200-byte file exponentially
    ("billion laughs") and a recursive one (``a: &a [*a]``) never ends. Nesting is bounded too.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (`*name`) are not supported in configs; write the value out",
                event.start_mark,
            )
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                self.peek_event().start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
        |[-+]?[0-9][0-9_]*\.[0-9_]*
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text (``1e-3`` is a float, as in OmegaConf)."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def _package_dir(name: str) -> Path | None:
    """The folder of package ``name``, found without importing it (the recipes' package would
    import their models); None when it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def bundled_configs_dir() -> Path:
    """The ``configs/`` fragments shipped with statplug (installed as ``statplug/configs``)."""
    return _package_dir("statplug.configs") or Path("statplug/configs")


def bundled_recipes_dir() -> Path:
    """The ``recipes/`` shipped with statplug (installed as the package ``statplug.recipes``)."""
    return _package_dir("statplug.recipes") or Path("statplug/recipes")


def bundled_recipes() -> dict[str, Path]:
    """Bundled recipe names mapped to their files, sorted by name."""
    folder = bundled_recipes_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_recipe(recipe: str | Path) -> Path:
    """The file of ``recipe``: an existing path, else a bundled recipe name.

    Raises:
        ConfigError: no such file nor bundled recipe (names the closest bundled one).
    """
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"recipe `{recipe}` is not a file")
    bundled = bundled_recipes()
    name = str(recipe)
    if name in bundled:
        return bundled[name]
    if name.endswith((".yaml", ".yml")) and path.name in {p.name for p in bundled.values()}:
        return bundled[path.stem]
    guess = closest(path.stem, bundled)
    hint = f"; did you mean `{guess}`?" if guess else ""
    listing = ", ".join(bundled) or "none"
    raise ConfigError(
        f"recipe file not found: `{recipe}`{hint} (bundled recipes: {listing}; "
        "`statplug recipes` lists them)"
    )


def _read_text(path: Path) -> str:
    """A config file's text: a regular file, at most ``MAX_YAML_BYTES``, UTF-8."""
    try:
        if not path.is_file():
            missing = not path.exists()
            raise ConfigError(f"file not found: `{path}`" if missing else f"`{path}` is not a file")
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(
                f"`{path}` is {size:,} bytes; a config file is at most {MAX_YAML_BYTES:,} bytes"
            )
        raw = path.read_bytes()[: MAX_YAML_BYTES + 1]  # it may have grown since the stat
    except OSError as err:
        raise ConfigError(f"cannot read `{path}`: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"bad YAML in {path}: not UTF-8 text (byte {err.start} is {raw[err.start]:#04x})"
        ) from None


def load_yaml(path: Path) -> DictConfig:
    """Read one YAML mapping with OmegaConf; bad YAML names the file and the line."""
    text = _read_text(path)
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, cmark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and cmark is not None and (mark is None or cmark.line != mark.line):
            problem += f" ({context} at line {cmark.line + 1})"
        raise ConfigError(f"bad YAML in {where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"bad YAML in {path}: expected a mapping of keys at the top, got a "
            f"{type(data).__name__}"
        )
    try:
        return OmegaConf.create(data)
    except OMEGACONF_ERRORS as err:
        raise ConfigError(f"bad config in {path}: {first_line(err)}") from None


@dataclass
class Recipe:
    """A composed recipe: the config, where it came from, and which keys the user overrode."""

    config: DictConfig
    path: Path
    name: str
    fragments: dict[str, str] = field(default_factory=dict)
    overridden: set[str] = field(default_factory=set)


def _group_dirs(recipe_path: Path) -> list[Path]:
    dirs: list[Path] = []
    here = recipe_path.resolve().parent
    for local in (here / "configs", here.parent / "configs"):
        if local.is_dir() and local not in dirs:
            dirs.append(local)
    bundled = bundled_configs_dir().resolve()
    if bundled.is_dir() and bundled not in dirs:
        dirs.append(bundled)
    return dirs


def _groups(dirs: list[Path]) -> set[str]:
    return {p.name for d in dirs for p in d.iterdir() if p.is_dir()}


def check_name(what: str, name: str, where: str) -> None:
    """Group and fragment names are names (letters, digits, ``-``, ``_``), never paths."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"bad {what} `{name}` in {where}: a {what} is a name of letters, digits, `-` and `_` "
            "(configs/GROUP/NAME.yaml), not a path"
        )


def _fragment_path(group: str, name: str, dirs: list[Path]) -> Path:
    check_name("config group", group, "the defaults or overrides")
    check_name(f"{group} config name", name, "the defaults or overrides")
    for d in dirs:
        for ext in (".yaml", ".yml"):
            p = d / group / f"{name}{ext}"
            if p.is_file():
                return p
    options = sorted({p.stem for d in dirs for p in (d / group).glob("*.y*ml")})
    if not options:
        raise ConfigError(
            f"unknown config group `{group}`; groups are the folders of configs/: "
            f"{', '.join(sorted(_groups(dirs)))}"
        )
    guess = closest(name, options)
    hint = f"; did you mean `{guess}`?" if guess else ""
    raise ConfigError(
        f"unknown {group} config `{name}`{hint} (available: {', '.join(options)})"
    )


def _parse_defaults(node: Any, path: Path) -> dict[str, str]:
    """``defaults`` as an ordered ``{group: fragment}`` mapping."""
    if node is None:
        return {}
    container = OmegaConf.to_container(node) if isinstance(node, DictConfig | ListConfig) else node
    items: list[tuple[Any, Any]] = []
    if isinstance(container, dict):
        items = list(container.items())
    elif isinstance(container, list):
        for entry in container:
            if not (isinstance(entry, dict) and len(entry) == 1):
                raise ConfigError(
                    f"bad `defaults` in {path}: expected entries like `- trainer: cpu`, got "
                    f"{entry!r}"
                )
            items.extend(entry.items())
    else:
        raise ConfigError(
            f"bad `defaults` in {path}: expected a list like `[{{trainer: cpu}}]` or a mapping, "
            f"got {container!r}"
        )
    out: dict[str, str] = {}
    for group, name in items:
        if not isinstance(name, str):
            raise ConfigError(
                f"bad `defaults` in {path}: `{group}` must name a file of configs/{group}/, got "
                f"{name!r}"
            )
        check_name("config group", str(group), f"the `defaults` of {path}")
        check_name(f"{group} config name", name, f"the `defaults` of {path}")
        out[str(group)] = name
    return out


def parse_overrides(
    overrides: Sequence[str], groups: set[str]
) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """Split ``key=value`` strings into group selections and key assignments (YAML values)."""
    selections: dict[str, str] = {}
    assignments: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"bad override `{item}`: expected `key=value`, e.g. trainer.max_epochs=3"
            )
        if key.startswith("+"):
            key = key[1:]
        if any(not part.isidentifier() and not part.replace("-", "_").isidentifier()
               for part in key.split(".")):
            raise ConfigError(f"bad override `{item}`: `{key}` is not a dotted key")
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML: keep the text
        if key in groups and "." not in key and isinstance(value, str):
            check_name(f"{key} config name", value, f"the override `{item}`")
            selections[key] = value
        else:
            assignments.append((key, value))
    return selections, assignments


def compose(recipe: str | Path, overrides: Sequence[str] = (), *, trust: bool = False) -> Recipe:
    """Read ``recipe`` (a path or a bundled name), merge its fragments and apply ``overrides``.

    ``recipe`` may also be a checkpoint written by ``statplug fit``: its stored config is re-run
    (a ``group=name`` override then goes over the stored group). Unless ``trust`` it is read
    with ``weights_only=True`` and its config is checked as it is read: the allowlist of
    targets, references to its own keys only (:mod:`statplug.config.stored`). The recipe file,
    its fragments and the overrides are the user's own and are not restricted.

    A callback that no earlier layer (fragments, then the recipe, then earlier overrides) defines
    must come with its ``_target_``: anything else under its name (``callbacks.audt=null``) is a
    misspelled key.

    The result is not yet validated against the targets' signatures; see
    :func:`statplug.config.validate.validate`.

    Raises:
        ConfigError: missing file, bad YAML, unknown fragment, malformed override, unknown key.
    """
    path = find_recipe(recipe)
    stored = path.suffix in CHECKPOINT_SUFFIXES
    raw = read_stored_config(path, trust=trust) if stored else load_yaml(path)
    dirs = _group_dirs(path)
    groups = _groups(dirs)
    fragments = _parse_defaults(raw.pop("defaults", None), path)
    selections, assignments = parse_overrides(overrides, groups)
    fragments.update(selections)
    try:
        cfg: Any = OmegaConf.create()
        if stored:
            # A stored config is already composed: a selected fragment goes over it.
            cfg = raw
        for group, name in fragments.items():
            frag = load_yaml(_fragment_path(group, name, dirs))
            cfg = OmegaConf.merge(cfg, {group: frag})
        if not stored:
            layer = raw.get("callbacks")
            if isinstance(layer, DictConfig):
                for cb_name in layer:
                    _check_callback_name(cfg, [str(cb_name)], layer[cb_name], f" (in {path})")
            cfg = OmegaConf.merge(cfg, raw)
        new = _new_callbacks(assignments)
        for key, value in assignments:
            parts = key.split(".")
            if parts[0] == "callbacks" and len(parts) > 1 and parts[1] not in new:
                _check_callback_name(cfg, parts[1:], value, " (command-line override)")
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    except OMEGACONF_ERRORS as err:
        raise ConfigError(f"cannot compose recipe {path}: {first_line(err)}") from None
    assert isinstance(cfg, DictConfig)
    return Recipe(
        config=cfg,
        path=path,
        name=path.stem,
        fragments=fragments,
        overridden={k for k, _ in assignments},
    )


def _new_callbacks(assignments: list[tuple[str, Any]]) -> set[str]:
    """Callbacks the overrides define: ``callbacks.NAME={_target_: ...}`` or, dotted,
    ``callbacks.NAME._target_=...`` (then ``callbacks.NAME.arg=...`` in any order)."""
    new = set()
    for key, value in assignments:
        parts = key.split(".")
        if parts[0] != "callbacks" or len(parts) < 2:
            continue
        if parts[2:] == ["_target_"] or (
            len(parts) == 2 and isinstance(value, dict) and "_target_" in value
        ):
            new.add(parts[1])
    return new


def _check_callback_name(cfg: DictConfig, parts: list[str], value: Any, origin: str) -> None:
    """Refuse ``callbacks.NAME...`` when no earlier layer defines NAME and this is no new node."""
    defined = cfg.get("callbacks")
    known = [str(k) for k in defined] if isinstance(defined, DictConfig) else []
    name = parts[0]
    if name in known:
        return
    is_node = isinstance(value, dict | DictConfig) and "_target_" in value
    if len(parts) == 1 and is_node:
        return  # a new callback
    guess = closest(name, known)
    hint = f"; did you mean `callbacks.{guess}`?" if guess else ""
    listing = ", ".join(known) or "none"
    raise ConfigError(
        f"unknown key `callbacks.{'.'.join(parts)}`{hint} (callbacks defined so far: {listing}; "
        f"a new one needs a `_target_`){origin}"
    )


def unresolved(cfg: DictConfig) -> dict[str, Any]:
    """A copy of ``cfg`` in plain Python with its interpolations kept as text (what a
    checkpoint stores: ``${oc.env:TOKEN}`` stays ``${oc.env:TOKEN}``)."""
    out = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(out, dict)
    return upgrade_targets({str(k): v for k, v in out.items()})  # type: ignore[no-any-return]


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """A resolved copy of ``cfg`` in plain Python (loads with ``torch.load(weights_only=True)``)."""
    try:
        out = OmegaConf.to_container(cfg, resolve=True)
    except OMEGACONF_ERRORS as err:
        raise ConfigError(f"cannot resolve the config: {first_line(err)}") from None
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items()}
