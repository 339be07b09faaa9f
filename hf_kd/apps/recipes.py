"""Recipes: flat YAML of recipe fields (`hf_kd.apps.arguments` and `DistillationConfig`), found by path or
by the name of a packaged recipe (`rotten_tomatoes`, `tasks/causal_lm`, `methods/rkd.yaml`), turned into
command-line words so that the command line overrides them, then into the dataclasses.

An optional `quick:` block holds the overrides that `--quick` applies; `base: OTHER.yaml` (relative to the
recipe) starts from another recipe.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .arguments import PARSER_TYPES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "rotten_tomatoes"


def find_recipe(name: str | Path) -> Path:
    """A recipe file: `name` itself when it is a file, else the packaged recipe of that name (.yaml optional)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / path, RECIPES_DIR / f"{path}.yaml"):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    names = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    raise SystemExit(f"hf-kd: recipe {name} does not exist. Pass --config FILE.yaml or a packaged recipe: "
                     f"{', '.join(names)}.")


def recipe_of(argv: list[str]) -> Path | None:
    """The recipe file a distill command line runs: its ``--config`` (a file or a packaged name), else the default."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_RECIPE)
    known, _ = pre.parse_known_args(argv)
    try:
        return find_recipe(known.config)
    except SystemExit:  # a command line that named no runnable recipe: the card records none
        return None


def load_recipe(path: str | Path, quick: bool = False) -> dict:
    """A recipe's fields (with its `quick:` block applied when `quick`). `base: OTHER.yaml` (relative to the
    recipe) starts from that recipe: its fields, then this one's; the quick blocks merge the same way."""
    recipe, quick_block = _read_recipe(find_recipe(path), ())
    if quick and not quick_block:
        raise SystemExit(f"hf-kd: --quick applies a recipe's quick: block, and {path} has none; drop --quick, or add "
                         "a quick: block of overrides (e.g. max_train_samples: 256) to the recipe.")
    return overlay(recipe, quick_block) if quick else recipe


def _read_recipe(path: Path, seen: tuple) -> tuple[dict, dict]:
    if not path.is_file():
        raise SystemExit(f"hf-kd: recipe {path} does not exist. Pass --config recipes/NAME.yaml.")
    if path.resolve() in seen:
        raise SystemExit(f"hf-kd: recipe {path} names itself as a base, through {[str(p) for p in seen]}.")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise SystemExit(f"hf-kd: recipe {path} is not valid YAML{line} ({getattr(err, 'problem', None) or err}); "
                         "write one field: value per line.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"hf-kd: recipe {path} cannot be read ({err}); pass a readable YAML file.") from None
    if not isinstance(recipe, dict):
        raise SystemExit(f"hf-kd: recipe {path} must be a mapping of field: value.")
    quick_block = recipe.pop("quick", None) or {}
    if not isinstance(quick_block, dict):
        raise SystemExit(f"hf-kd: the quick: block of recipe {path} must be a mapping of field: value.")
    base = recipe.pop("base", None)
    if base is None:
        return recipe, quick_block
    fields, base_quick = _read_recipe(path.parent / base, (*seen, path.resolve()))
    return overlay(fields, recipe), overlay(base_quick, quick_block)


#: The ways to make a student from the teacher: one choice, so a layer that names one replaces the others below it.
STUDENT_CHOICE = ("student_layers", "student_config", "student_prune")


def overlay(lower: dict, upper: dict) -> dict:
    """`upper`'s fields over `lower`'s (a recipe over its base, a quick block over its recipe). A student named in
    `upper` (student_layers, student_config or student_prune) replaces the one `lower` names, instead of both being
    given at once: a recipe whose base prunes the teacher can still say `student_layers: 3`."""
    if any(k in upper for k in STUDENT_CHOICE):
        lower = {k: v for k, v in lower.items() if k not in STUDENT_CHOICE}
    return {**lower, **upper}


def _flags(argv: list[str]) -> set[str]:
    """The option names a command line gives (`--name value` or `--name=value`)."""
    return {w[2:].split("=")[0] for w in argv if w.startswith("--")}


def _argv_from_recipe(recipe: dict, parser: argparse.ArgumentParser) -> list[str]:
    """Turn recipe values into command-line words so that the command line can override them."""
    argv = []
    for key, value in recipe.items():
        if value is None:
            continue
        action = parser._option_string_actions[f"--{key}"]
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)) and action.nargs in ("+", "*"):
            argv.extend(str(v) for v in value)
        elif isinstance(value, (list, dict)):
            argv.append(json.dumps(value))
        elif isinstance(value, bool):
            argv.append(str(value).lower())
        else:
            argv.append(str(value))
    return argv


def check_keys(recipe: dict, parser: argparse.ArgumentParser, source: str) -> None:
    valid = {a.dest for a in parser._actions if a.dest != "help"}
    unknown = [k for k in recipe if k not in valid]
    if unknown:
        raise SystemExit(f"hf-kd: unknown key in {source}: {_nearest(unknown, valid, '')}. Run `hf-kd distill --help` "
                         "for fields.")


def _nearest(names, valid, prefix: str) -> str:
    """`'name' (did you mean 'other'?)`, for each unknown name."""
    lines = []
    for key in names:
        near = difflib.get_close_matches(key, valid, n=1)
        lines.append(f"'{prefix}{key}'" + (f" (did you mean '{prefix}{near[0]}'?)" if near else ""))
    return ", ".join(lines)


def _unknown_flags(argv: list[str], parser: argparse.ArgumentParser, prog: str) -> None:
    """Refuse command-line words that are no option of `parser`, naming the nearest options."""
    valid = {a.dest for a in parser._actions if a.dest != "help"}
    _, extra = parser.parse_known_args(argv)
    if extra:
        flags = [w[2:].split("=")[0] for w in extra if w.startswith("--")]
        what = _nearest(flags, valid, "--") if flags else " ".join(extra)
        raise SystemExit(f"hf-kd: {prog} has no option {what}. Run `{prog} --help` for the options.")


def parse_recipe_args(types, argv: list[str], prog: str, default_config=None) -> tuple:
    """The dataclasses `types` filled from a recipe (`--config`, `--quick`) plus command-line overrides."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default_config, required=default_config is None)
    pre.add_argument("--quick", action="store_true")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(types, prog=prog)
    if "-h" in rest or "--help" in rest:
        _add_recipe_options(parser, default_config)  # listed in the help; parsed by `pre` above
        parser.print_help()
        raise SystemExit(0)
    recipe = load_recipe(known.config, quick=known.quick)
    check_keys(recipe, parser, str(known.config))
    # A student named on the command line replaces the recipe's (None: no value from the recipe).
    recipe = overlay(recipe, dict.fromkeys(_flags(rest) & set(STUDENT_CHOICE)))
    argv = _argv_from_recipe(recipe, parser) + rest
    _unknown_flags(argv, parser, prog)
    try:
        return tuple(parser.parse_args_into_dataclasses(args=argv))
    except ValueError as err:
        raise SystemExit(f"hf-kd: {err}") from None


def _add_recipe_options(parser: argparse.ArgumentParser, default_config) -> None:
    group = parser.add_argument_group("recipe")
    group.add_argument("--config", default=default_config,
                       help="A recipe: a YAML file or the name of a packaged recipe (e.g. tasks/causal_lm); its fields "
                       "are the other options listed here, and those given on the command line override it.")
    group.add_argument("--quick", action="store_true", help="Apply the recipe's quick: block (a short smoke run).")


def parse_distill_args(argv: list[str], prog: str = "hf-kd distill"):
    """(ModelArguments, DataArguments, RunArguments, DistillationConfig) from a recipe plus overrides."""
    return parse_recipe_args(PARSER_TYPES, argv, prog, default_config=DEFAULT_RECIPE)
