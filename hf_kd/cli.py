"""`hf-kd` command line: `hf-kd distill --config recipes/NAME.yaml [--any_field value ...]`, and
`hf-kd push --model DIR --repo_id NAME` to publish a saved student (see `hf_kd.hub`), and
`hf-kd cache-teacher --config RECIPE --output_dir DIR` to save a teacher's outputs (see `hf_kd.teacher_cache`).
`hf-kd init-student --teacher DIR --layers 3 --output_dir DIR` to make a student folder (see `hf_kd.student`).

A recipe is a flat YAML of field names from `ModelArguments`, `DataArguments`, `RunArguments` and
`DistillationConfig` (so every `TrainingArguments` flag). Values given on the command line override
the recipe. An optional `quick:` block holds the overrides that `--quick` applies. A recipe with a `task:` field
(recipes/tasks) runs through `hf_kd.task_data` instead of the demo pipeline.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .config import DistillationConfig

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "rotten_tomatoes.yaml"


@dataclass
class ModelArguments:
    teacher_model_name_or_path: str = field(
        metadata={"help": "Teacher: a Hub id or local folder. Known Hub ids fall back to installed offline copies."}
    )
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "An existing student (Hub id or folder). Else see student_layers."}
    )
    student_layers: str | None = field(
        default=None,
        metadata={
            "help": "Make the student from teacher layers, with their weights: a 1-based list (e.g. [1,3,5]) or a "
            "number N (N layers spread evenly, the last included; see hf_kd.student.uniform_layers)."
        },
    )
    student_config: str | None = field(
        default=None,
        metadata={
            "help": "Instead of student_layers: a fresh student of the teacher's architecture with these config "
            "fields changed, a mapping such as {hidden_size: 192, intermediate_size: 768, num_attention_heads: 6, "
            "num_hidden_layers: 3}."
        },
    )
    teacher_finetune_epochs: float = field(
        default=0.0,
        metadata={
            "help": "If > 0, first fine-tune the teacher on the training split for this many epochs "
            "(cached under cache_dir, reused by later runs with the same settings)."
        },
    )
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the teacher fine-tune."})
    teacher_seed: str = field(
        default="42",
        metadata={
            "help": "Seed of the teacher fine-tune, apart from `seed` so that student seeds share one teacher. A list "
            "such as [42, 7] fine-tunes one teacher per seed and distils from all of them (several teachers, "
            "weighted by teacher_weights)."
        },
    )
    cache_dir: str = field(default="~/.cache/hf_kd", metadata={"help": "Where fine-tuned teachers are cached."})

    def __post_init__(self):
        from .student import parse_student_config, parse_student_layers

        for name in ("student_layers", "student_config"):  # `--student_layers null` unsets a recipe's value
            if isinstance(getattr(self, name), str) and getattr(self, name).strip().lower() in ("", "null", "none"):
                setattr(self, name, None)
        if self.student_layers is not None and self.student_config is not None:
            raise ValueError("give student_layers (teacher layers and weights) or student_config (fresh weights), "
                             "not both.")
        if self.student_layers is not None:
            parse_student_layers(self.student_layers)
        if self.student_config is not None:
            parse_student_config(self.student_config)
        self.teacher_seeds = parse_seeds(self.teacher_seed)
        self.teacher_seed = self.teacher_seeds[0]  # the (first) teacher's seed, an int


def parse_seeds(value) -> list[int]:
    """`teacher_seed`: one int, or a JSON/YAML list of distinct ints (one fine-tuned teacher each)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    seeds = value if isinstance(value, list) else [value]
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"teacher_seed={value!r} must be an integer or a list of distinct integers, e.g. 42 or [42, 7].")
    return seeds


@dataclass
class DataArguments:
    dataset_name: str = field(
        metadata={"help": "datasets.load_dataset path: a Hub id, a local folder or a csv/json/parquet file."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default="test", metadata={"help": "Held-out split for the final evaluation."})
    text_column: str = field(default="text", metadata={"help": "Column with the input text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for pair tasks."})
    label_column: str = field(default="label", metadata={"help": "Column with the class label."})
    class_names: str | None = field(
        default=None,
        metadata={"help": "Names of integer labels 0..N-1 as a JSON list, e.g. [negative, positive] in YAML."},
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N held-out rows."})
    unlabelled_samples: int | None = field(
        default=None,
        metadata={
            "help": "Also distil on the next N training rows after the first max_train_samples, with their labels "
            "dropped: an unlabelled transfer set that only the teacher's targets train on. The teacher's fine-tune "
            "and the baseline see the labelled rows alone."
        },
    )


@dataclass
class RunArguments:
    baseline: bool = field(
        default=False,
        metadata={"help": "Also train the same student from the same start on labels alone, for comparison."},
    )
    report: bool = field(default=False, metadata={"help": "Write report.md / report.png with latency and sizes."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a run."}
    )


PARSER_TYPES = (ModelArguments, DataArguments, RunArguments, DistillationConfig)


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


def load_recipe(path: str | Path, quick: bool = False) -> dict:
    """A recipe's fields (with its `quick:` block applied when `quick`). `base: OTHER.yaml` (relative to the
    recipe) starts from that recipe: its fields, then this one's; the quick blocks merge the same way."""
    recipe, quick_block = _read_recipe(Path(path), ())
    if quick:
        recipe.update(quick_block)
    return recipe


def _read_recipe(path: Path, seen: tuple) -> tuple[dict, dict]:
    if not path.is_file():
        raise SystemExit(f"hf-kd: recipe {path} does not exist. Pass --config recipes/NAME.yaml.")
    if path.resolve() in seen:
        raise SystemExit(f"hf-kd: recipe {path} names itself as a base, through {[str(p) for p in seen]}.")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise SystemExit(f"hf-kd: recipe {path} must be a mapping of field: value.")
    quick_block = recipe.pop("quick", None) or {}
    base = recipe.pop("base", None)
    if base is None:
        return recipe, quick_block
    fields, base_quick = _read_recipe(path.parent / base, (*seen, path.resolve()))
    return {**fields, **recipe}, {**base_quick, **quick_block}


def check_keys(recipe: dict, parser: argparse.ArgumentParser, source: str) -> None:
    valid = {a.dest for a in parser._actions if a.dest != "help"}
    unknown = [k for k in recipe if k not in valid]
    if unknown:
        lines = []
        for key in unknown:
            near = difflib.get_close_matches(key, valid, n=1)
            lines.append(f"'{key}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
        raise SystemExit(f"hf-kd: unknown key in {source}: {', '.join(lines)}. Run `hf-kd distill --help` for fields.")


def parse_recipe_args(types, argv: list[str], prog: str, default_config=None) -> tuple:
    """The dataclasses `types` filled from a recipe (`--config`, `--quick`) plus command-line overrides."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default_config, required=default_config is None)
    pre.add_argument("--quick", action="store_true")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(types, prog=prog)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        raise SystemExit(0)
    recipe = load_recipe(known.config, quick=known.quick)
    check_keys(recipe, parser, str(known.config))
    try:
        return tuple(parser.parse_args_into_dataclasses(args=_argv_from_recipe(recipe, parser) + rest))
    except ValueError as err:
        raise SystemExit(f"hf-kd: {err}") from None


def parse_distill_args(argv: list[str]):
    """(ModelArguments, DataArguments, RunArguments, DistillationConfig) from a recipe plus overrides."""
    return parse_recipe_args(PARSER_TYPES, argv, "hf-kd distill", default_config=DEFAULT_RECIPE)


def _recipe_task(argv: list[str]) -> str | None:
    """The `task:` of the recipe named by --config, if any (task recipes run through `hf_kd.task_data`)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return load_recipe(known.config).get("task") if known.config else None


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
    parser = argparse.ArgumentParser(prog="hf-kd cache-teacher", add_help=False)
    parser.add_argument("--top_k", type=int, default=64, help="Teacher logits kept per row (capped at the classes).")
    parser.add_argument("--cache_hidden", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                        help="Also keep the hidden states of the teacher layers the recipe's layer_map needs (fp16).")
    return parser.parse_known_args(argv)


def run_push(args: argparse.Namespace) -> None:
    from .hub import CARD_NAME, PushError, check_student_folder, push_student

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
    args = parser.parse_args(argv)
    if (args.layers is None) == (args.student_config is None):
        parser.error("give --layers or --student_config (one of them).")
    return args


def run_init_student(args: argparse.Namespace) -> None:
    import torch

    from .student import init_student

    torch.manual_seed(args.seed)
    try:
        from .offline import resolve_model

        summary = init_student(resolve_model(args.teacher), args.output_dir, layers=args.layers, student_config=args.student_config,
                               overwrite_output_dir=args.overwrite_output_dir)
    except (ValueError, OSError) as err:
        raise SystemExit(f"hf-kd init-student: {err}") from None
    made = (f"teacher layers {summary['layers']} of {summary['teacher_layers']}" if "layers" in summary
            else f"fresh weights, config changes {json.dumps(summary['student_config'])}")
    print(f"[hf-kd] student ({made}, {summary['parameters'] / 1e6:.2f}M parameters, teacher "
          f"{summary['teacher_parameters'] / 1e6:.2f}M) written to {summary['output_dir']}"
          + ("" if summary["tokenizer"] else " (the teacher folder has no tokenizer)"), flush=True)


def check_model_paths(model_args) -> None:
    """A clear message for a teacher or student that is neither a readable model folder nor (online) a Hub id,
    and for a student folder whose tokenizer numbers tokens otherwise than the teacher's."""
    import os

    from .offline import resolve_model

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    folders = {}
    for field_name in ("teacher_model_name_or_path", "student_model_name_or_path"):
        name = getattr(model_args, field_name)
        if not name:
            continue
        path = Path(os.path.expanduser(resolve_model(name)))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise SystemExit(f"hf-kd: {field_name}={name!r} is a folder without config.json; point it at a folder "
                                 "saved with save_pretrained.")
            if not os.access(path / "config.json", os.R_OK):
                raise SystemExit(f"hf-kd: {field_name}={name!r}: {path / 'config.json'} is not readable; fix its "
                                 "permissions.")
            folders[field_name] = path
            architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
            # A student may start from a base model (its new head is trained); a teacher's head must be trained.
            teacher_as_is = field_name.startswith("teacher") and model_args.teacher_finetune_epochs <= 0
            if teacher_as_is and architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
                raise SystemExit(
                    f"hf-kd: {field_name}={name!r} is a {architectures[0]}, not a sequence classifier: its "
                    "classification head would be random. Give a fine-tuned classifier, or set "
                    "teacher_finetune_epochs > 0 to fine-tune it first."
                )
        elif path.exists():
            raise SystemExit(f"hf-kd: {field_name}={name!r} is a file; give the model's folder.")
        elif offline or name.startswith((".", "/", "~")):
            raise SystemExit(
                f"hf-kd: {field_name}={name!r} does not exist"
                + (" and the Hub is offline (HF_HUB_OFFLINE=1)" if offline else "")
                + "; check the path, or give a Hub id while online."
            )
    if len(folders) == 2:
        from .distill.checks import check_tokenizers, load_tokenizer
        from .errors import InputError

        try:
            check_tokenizers(load_tokenizer(str(folders["student_model_name_or_path"])),
                             load_tokenizer(str(folders["teacher_model_name_or_path"])))
        except InputError as err:
            raise SystemExit(f"hf-kd: {err}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "distill": "distil a teacher into a student from a YAML recipe (default: the Rotten Tomatoes demo)",
        "push": "publish a saved student to the Hugging Face Hub (hf-kd push --model DIR --repo_id NAME)",
        "cache-teacher": "run a recipe's teacher once and save its top-k logits for distill --teacher_cache DIR",
        "init-student": "write a student made from a teacher (hf-kd init-student --teacher DIR --layers 3 --output_dir DIR)",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: hf-kd COMMAND [options]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:10s} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nhf-kd: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    if command == "distill" and _recipe_task(rest):  # a task recipe (recipes/tasks): see hf_kd.task_data
        from .task_data import main as run_task

        return run_task(rest)
    if command == "distill":
        from .errors import InputError, NonFiniteLossError
        from .hub import PushError
        from .pipeline import run_distill

        parsed = parse_distill_args(rest)
        check_model_paths(parsed[0])
        try:
            run_distill(*parsed)
        except (PushError, InputError, NonFiniteLossError) as err:  # a message, not a traceback
            raise SystemExit(f"hf-kd: {err}") from None
    elif command == "push":
        run_push(parse_push_args(rest))
    elif command == "cache-teacher":
        from .errors import InputError
        from .teacher_cache import run_cache_teacher

        options, rest = parse_cache_args(rest)
        parsed = parse_distill_args(rest)
        check_model_paths(parsed[0])
        try:
            run_cache_teacher(*parsed, top_k=options.top_k, cache_hidden=options.cache_hidden)
        except InputError as err:
            raise SystemExit(f"hf-kd: {err}") from None
    elif command == "init-student":
        run_init_student(parse_init_student_args(rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
