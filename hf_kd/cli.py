"""`hf-kd` command line: parse, call an application (`hf_kd.apps`), print.

- `hf-kd distill [--config RECIPE] [--quick] [--any_field value ...]`: the one distillation path for every task
  (`hf_kd.apps.distill`). RECIPE is a YAML file or the name of a packaged recipe (`rotten_tomatoes`, the default;
  `tasks/causal_lm`, `methods/rkd`, ...; see `hf_kd.apps.recipes`). Values given on the command line override the
  recipe; `--quick` applies its `quick:` block.
- `hf-kd push --model DIR --repo_id NAME` publishes a saved student (see `hf_kd.hub`).
- `hf-kd cache-teacher --config RECIPE --output_dir DIR` saves a teacher's outputs (`hf_kd.apps.cache_teacher`).
- `hf-kd init-student --teacher DIR --layers 3 --output_dir DIR` makes a student folder (see `hf_kd.student`); with
  `--prune width --hidden_size H ... --calibration DATA`, pruned by importance (`hf_kd.apps.prune`, `hf_kd.pruning`).
- `hf-kd search --config RECIPE --trials N` searches the distillation settings (`hf_kd.apps.search`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

import torch
from transformers.hf_argparser import string_to_bool

from .apps.arguments import PARSER_TYPES, DataArguments, ModelArguments, RunArguments, parse_seeds
from .apps.cache_teacher import run_cache_teacher
from .apps.distill import run_distill
from .apps.offline import resolve_model
from .apps.prune import add_prune_arguments, check_prune_arguments, run_prune_student
from .apps.search import run_search_command
from .apps.recipes import DEFAULT_RECIPE, load_recipe, parse_distill_args, parse_recipe_args
from .apps.validate import init_student_problems, repo_id_problem
from .errors import InputError, NonFiniteLossError
from .hub import CARD_NAME, PushError, check_student_folder, push_student
from .student import init_student

__all__ = [
    "main", "parse_distill_args", "parse_recipe_args", "load_recipe", "DEFAULT_RECIPE", "PARSER_TYPES",
    "ModelArguments", "DataArguments", "RunArguments", "parse_seeds",
]


def parse_push_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-kd push",
        description="Publish a student saved by hf-kd distill (or DistillationTrainer.save_model) to the Hugging "
        "Face Hub: config, safetensors weights, tokenizer, model card and provenance; no pickles, projection heads "
        "or checkpoints. The folder is never modified.",
    )
    parser.add_argument("--model", required=True, help="The saved student folder (the run's output_dir).")
    parser.add_argument("--repo_id", required=True, help="The Hub repo to create or update: NAME or ORG/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repo private (no effect if it exists).")
    parser.add_argument("--token", default=None, help="A Hub token with write access (default: your login / HF_TOKEN).")
    parser.add_argument("--revision", default=None, help="Branch to commit to (default: main).")
    parser.add_argument("--commit_message", default="Upload a student distilled with hf_kd")
    parser.add_argument("--dry_run", action="store_true", help="List what would be published; do not contact the Hub.")
    return parser.parse_args(argv)


def parse_cache_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`hf-kd cache-teacher`'s own options; the rest is a distill command line (recipe, overrides, output_dir)."""
    parser = argparse.ArgumentParser(
        prog="hf-kd cache-teacher", add_help=False,
        description="Run a recipe's teacher once over its training rows and save its top-k logits (and, optionally, "
        "hidden states) for hf-kd distill --teacher_cache DIR. Its own options come first; the rest is a distill "
        "command line (the recipe and any of its fields, listed after these).")
    parser.add_argument("--top_k", type=int, default=64, help="Teacher logits kept per row (capped at the classes).")
    parser.add_argument("--cache_hidden", type=string_to_bool, default=False, metavar="{true,false}",
                        help="Also keep the hidden states of the teacher layers the recipe's layer_map needs (fp16).")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print()
    return parser.parse_known_args(argv)


def run_push(args: argparse.Namespace) -> None:
    problem = repo_id_problem(args.repo_id)
    if problem:
        raise SystemExit(f"hf-kd push: {problem}")
    try:
        if args.dry_run:
            names = check_student_folder(args.model)
            if CARD_NAME not in names:
                names.append(f"{CARD_NAME} (rendered from the provenance)")
            print(f"[hf-kd] would push to {args.repo_id}:\n  " + "\n  ".join(names), flush=True)
            return
        info = push_student(
            args.model, args.repo_id, token=args.token, private=args.private or None, revision=args.revision,
            commit_message=args.commit_message,
        )
    except PushError as err:
        raise SystemExit(f"hf-kd push: {err}") from None
    print(f"[hf-kd] pushed {args.model} to {getattr(info, 'commit_url', None) or args.repo_id}", flush=True)


def parse_init_student_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-kd init-student",
        description="Write a student made from a teacher folder: some of its layers with their weights (--layers), "
        "or its architecture with config fields changed and fresh weights (--student_config); the teacher's "
        "tokenizer is copied. Use the folder as student_model_name_or_path.",
    )
    parser.add_argument("--teacher", required=True, help="The teacher's folder (saved with save_pretrained).")
    parser.add_argument("--layers", default=None,
                        help="N (N layers spread evenly, the last included; every other one for N = L/2) or a "
                        "1-based list such as [1,3,5].")
    parser.add_argument("--student_config", default=None,
                        help="Config fields to change, as JSON/YAML, e.g. '{hidden_size: 192, num_attention_heads: 6}'.")
    parser.add_argument("--output_dir", required=True, help="Where to write the student.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Allow an output_dir that holds files.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the fresh weights (--student_config).")
    add_prune_arguments(parser)
    args = parser.parse_args(argv)
    check_prune_arguments(parser, args)
    if args.prune is None and (args.layers is None) == (args.student_config is None):
        parser.error("give --layers or --student_config (one of them), or --prune.")
    return args


def run_init_student(args: argparse.Namespace) -> None:
    if args.prune is not None:
        run_prune_student(args)
        return
    problems = init_student_problems(args.teacher, args.output_dir, args.layers, args.student_config)
    if problems:
        raise SystemExit("hf-kd init-student: " + "\n  - ".join([""] * (len(problems) > 1) + problems).lstrip())
    torch.manual_seed(args.seed)
    try:
        summary = init_student(resolve_model(args.teacher), args.output_dir, layers=args.layers, student_config=args.student_config,
                               overwrite_output_dir=args.overwrite_output_dir)
    except (ValueError, OSError) as err:
        raise SystemExit(f"hf-kd init-student: {err}") from None
    made = (f"teacher layers {summary['layers']} of {summary['teacher_layers']}" if "layers" in summary
            else f"fresh weights, config changes {json.dumps(summary['student_config'])}")
    print(f"[hf-kd] student ({made}, {summary['parameters'] / 1e6:.2f}M parameters, teacher "
          f"{summary['teacher_parameters'] / 1e6:.2f}M) written to {summary['output_dir']}"
          + ("" if summary["tokenizer"] else " (the teacher folder has no tokenizer)"), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "distill": "distil a teacher into a student from a YAML recipe (default: the Rotten Tomatoes demo)",
        "push": "publish a saved student to the Hugging Face Hub (hf-kd push --model DIR --repo_id NAME)",
        "cache-teacher": "run a recipe's teacher once and save its top-k logits for distill --teacher_cache DIR",
        "init-student": "write a student made from a teacher (hf-kd init-student --teacher DIR --layers 3 --output_dir DIR)",
        "search": "search temperature, alpha and loss weights on a recipe (hf-kd search --config RECIPE --trials N)",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: hf-kd COMMAND [options]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:10s} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            near = difflib.get_close_matches(argv[0], commands, n=1)
            print(f"\nhf-kd: unknown command {argv[0]!r}" + (f" (did you mean {near[0]!r}?)" if near else ""),
                  file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    try:
        _run(command, rest)
    except (PushError, InputError, NonFiniteLossError) as err:  # a message, not a traceback
        raise SystemExit(f"hf-kd {command}: {err}") from None
    except (OSError, ValueError, ImportError, RuntimeError) as err:
        library = _library_of(err)
        if library is None or os.environ.get("HF_KD_TRACEBACK") == "1":
            raise  # our own bug: its traceback is what to report
        lines = str(err).strip().splitlines() or [""]
        raise SystemExit(f"hf-kd {command}: {library} stopped the run: {type(err).__name__}: {lines[0][:500]}"
                         " (set HF_KD_TRACEBACK=1 to see where)") from None
    return 0


def _run(command: str, rest: list[str]) -> None:
    if command in ("distill", "cache-teacher"):
        options, rest = parse_cache_args(rest) if command == "cache-teacher" else (None, rest)
        parsed = parse_distill_args(rest, prog=f"hf-kd {command}")
        if options is None:
            run_distill(*parsed)
        else:
            run_cache_teacher(*parsed, top_k=options.top_k, cache_hidden=options.cache_hidden)
    elif command == "push":
        run_push(parse_push_args(rest))
    elif command == "init-student":
        run_init_student(parse_init_student_args(rest))
    elif command == "search":
        run_search_command(rest)


#: Packages whose own errors reach the user as a message at the command line's boundary.
LIBRARIES = ("transformers", "datasets", "huggingface_hub", "tokenizers", "accelerate", "peft", "evaluate",
             "safetensors", "pyarrow", "torch", "yaml", "requests", "urllib3", "httpx")


def _library_of(err: BaseException) -> str | None:
    """The package that raised `err`: the innermost frame outside the standard library, when it is one of
    `LIBRARIES`; None when it is hf_kd's own code (a bug, whose traceback should be seen)."""
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    for name in reversed(frames):
        root = name.split(".")[0]
        if root in sys.stdlib_module_names:
            continue
        return root if root in LIBRARIES else None
    return None


if __name__ == "__main__":
    sys.exit(main())
