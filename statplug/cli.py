"""The ``statplug`` command: run recipes, and read stats back from checkpoints.

::

    statplug recipes                               # bundled recipes, one line each
    statplug fit RECIPE [key=value ...]            # last stdout line: the checkpoint path
    statplug inspect CKPT [--json] [--config]      # every stat, mask, encoding and buffer
    statplug plot CKPT -o stats.png                # per-feature mean ± std, min/max
    statplug plot CKPT CKPT ... -o time.png        # the stats across checkpoints (or a folder)
    statplug audit RECIPE [key=value ...]          # audit table of the model and optimizer
    statplug --version

``RECIPE`` is a YAML path or a bundled recipe name; overrides are ``a.b=value`` (YAML values) or
``group=name`` to pick another fragment of ``configs/`` (``trainer=ddp-cpu-2``). A mistake in
the recipe or the command line (unknown key, missing file, bad YAML, bad value) prints one line on
stderr, naming the key and the closest valid one, and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from statplug.config.errors import ConfigError
from statplug.errors import MissingExtraError, StatplugError

__all__ = ["main"]

PROG = "statplug"


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def version_line() -> str:
    """``statplug X (torch Y, lightning Z, python W)``: what a bug report needs first."""
    import platform
    from importlib import metadata

    import statplug

    parts = []
    for dist in ("torch", "lightning"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    parts.append(f"python {platform.python_version()}")
    return f"{PROG} {statplug.__version__} ({', '.join(parts)})"


# ----------------------------------------------------------------------------- recipes
def _describe(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "(unreadable YAML)"
    desc = data.get("description") if isinstance(data, dict) else None
    return " ".join(str(desc).split()) if desc else ""


def cmd_recipes(args: argparse.Namespace) -> int:
    from statplug.config.loader import bundled_recipes

    recipes = bundled_recipes()
    if not recipes:
        return _error("no bundled recipes found (is the statplug package data installed?)")
    width = max(len(n) for n in recipes)
    for name, path in recipes.items():
        print(f"{name.ljust(width)}  {_describe(path)}")
    return 0


# ----------------------------------------------------------------------------- fit
def _quiet_lightning() -> None:
    # Each recipe's data fits in memory: worker processes would only slow the small runs down.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    # Lightning's own use of a deprecated torch API; nothing a recipe can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _metrics_line(trainer: Any) -> str:
    parts = []
    for key, value in sorted(trainer.callback_metrics.items()):
        if "/" in key:  # per-layer details (ActivationStats): see `statplug inspect`
            continue
        try:
            parts.append(f"{key}={float(value):.4f}")
        except (TypeError, ValueError):
            continue
    return "metrics: " + " ".join(parts) if parts else "metrics: none logged"


def _show_progress(args: argparse.Namespace, config: dict[str, Any]) -> bool | None:
    """``--progress``/``--no-progress``, else the recipe's own choice, else whether stderr is a
    terminal (a log file or a pipe would fill with carriage-return redraws)."""
    if args.progress is not None:
        return bool(args.progress)
    if "enable_progress_bar" in (config.get("trainer") or {}):
        return None
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def cmd_fit(args: argparse.Namespace) -> int:
    from statplug.config.build import load_recipe
    from statplug.config.run import fit_run

    run = load_recipe(args.recipe, args.overrides, trust=args.trust)
    progress = _show_progress(args, run.config)
    # Everything Lightning prints during the run (the progress bar too) goes to stderr: stdout
    # carries the result only, and its last line is the checkpoint path (`... | tail -n 1`).
    with contextlib.redirect_stdout(sys.stderr):
        _quiet_lightning()
        result = fit_run(run, progress=progress)
    if result.trainer.is_global_zero:
        print(f"recipe: {run.name} ({run.path})")
        print(_metrics_line(result.trainer))
        print(result.checkpoint_path, flush=True)
    return 0


# ----------------------------------------------------------------------------- audit
def _optimizers(configured: Any) -> list[Any]:
    """The optimizers in any of the shapes ``configure_optimizers`` may return."""
    import torch

    if configured is None:
        return []
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, dict):
        return _optimizers(configured.get("optimizer"))
    if isinstance(configured, list | tuple):
        out: list[Any] = []
        for item in configured:
            if isinstance(item, torch.optim.Optimizer | dict):
                out.extend(_optimizers(item))
            elif isinstance(item, list | tuple) and item and isinstance(
                item[0], torch.optim.Optimizer
            ):
                out.extend(i for i in item if isinstance(i, torch.optim.Optimizer))
                break  # ([optimizers], [schedulers])
        return out
    return []


def cmd_audit(args: argparse.Namespace) -> int:
    from statplug.audit import audit
    from statplug.config.build import build_node, load_recipe

    run = load_recipe(args.recipe, args.overrides, require=("model",), trust=args.trust)
    with contextlib.redirect_stdout(sys.stderr):
        model = build_node(run.config["model"], "model", trust=True)
        model.statplug_config = run.stored
        optimizers = _optimizers(model.configure_optimizers())
    report = audit(model, optimizers or None)
    print(f"audit of recipe {run.name}: {type(model).__name__}, {len(optimizers)} optimizer(s)")
    print(str(report))
    return 0 if report.ok else 1


# ----------------------------------------------------------------------------- inspect, plot
def cmd_inspect(args: argparse.Namespace) -> int:
    from statplug.inspect.checkpoint import format_config, format_table, json_safe, summarize_file

    summary = summarize_file(args.checkpoint, trust=args.trust)
    if args.json:
        out = summary.to_json()
        if args.config:
            out["config"] = json_safe(summary.config)
        print(json.dumps(out, indent=2, allow_nan=False))
    else:
        print(format_table(summary))
        if args.config:
            print()
            print(format_config(summary))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from statplug._extras import require
    from statplug.inspect.checkpoint import summarize_file
    from statplug.inspect.plotting import checkpoint_files, plot_over_time, plot_summary

    if importlib.util.find_spec("matplotlib") is None:
        require("matplotlib", "`statplug plot`")  # the missing extra, named before any file
    files = checkpoint_files(args.checkpoints)
    summaries = [summarize_file(f, trust=args.trust) for f in files]
    # Imported once the files are read: matplotlib writes its config folder under HOME on
    # import, which a refused file should not cause.
    require("matplotlib", "`statplug plot`")
    if len(summaries) == 1:
        out = plot_summary(summaries[0], args.output)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            out = plot_over_time(summaries, args.output)
        for w in caught:  # one line each, not Python's two-line warning format
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    print(out)
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run statplug recipes and read running stats back from checkpoints.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("recipes", help="list the bundled recipes")
    p.set_defaults(func=cmd_recipes)

    overrides_help = "overrides: `a.b=value` (YAML value) or `group=name` (e.g. trainer=ddp-cpu-2)"
    recipe_trust_help = (
        "for a checkpoint given as RECIPE (only one you trust): load it with weights_only=False "
        "and build whatever its stored config names; without it a stored config builds only "
        "statplug's classes and an allowlist (Lightning's Trainer, callbacks and loggers, "
        "torchmetrics metrics). Your own YAML files and overrides need no --trust"
    )
    p = sub.add_parser("fit", help="train a recipe; the last line printed is the checkpoint path")
    p.add_argument("recipe", help="recipe YAML path or bundled name (see `statplug recipes`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.add_argument("--trust", action="store_true", help=recipe_trust_help)
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show Lightning's progress bar on stderr (default: when stderr is a terminal)",
    )
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("audit", help="audit the recipe's model and optimizer (exit 1 on errors)")
    p.add_argument("recipe", help="recipe YAML path or bundled name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.add_argument("--trust", action="store_true", help=recipe_trust_help)
    p.set_defaults(func=cmd_audit)

    trust_help = "load with weights_only=False (only for files you trust)"
    p = sub.add_parser("inspect", help="table of every stat, mask, encoding and buffer")
    p.add_argument("checkpoint", help="checkpoint file (.ckpt / .pt)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--config", action="store_true",
        help="also print the config stored in the checkpoint (recipe or LightningCLI)",
    )
    p.add_argument("--trust", action="store_true", help=trust_help)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "plot",
        help="PNG of per-feature mean ± std and min/max of the stats; with several checkpoints "
        "(or a folder of them), how each stat moved across them",
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CKPT",
        help="checkpoint files, or folders searched for *.ckpt/*.pt/*.pth",
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE.png", help="PNG to write")
    p.add_argument("--trust", action="store_true", help=trust_help)
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``statplug`` command with ``argv`` (default: ``sys.argv[1:]``); return the status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return status
    except (ConfigError, MissingExtraError) as err:
        return _error(str(err))
    except StatplugError as err:  # found while running (a checkpoint mismatch, an audit error)
        print(f"{PROG}: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`statplug inspect ... | head`): stop quietly, as `cat` does.
        _silence_stdout()
        return _SIGPIPE_STATUS


_SIGPIPE_STATUS = 141  # what a shell reports for a tool ended by SIGPIPE (128 + 13)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so Python's flush at exit does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # not a real file descriptor (a captured stream): nothing is flushed at exit


if __name__ == "__main__":
    sys.exit(main())
